"""The message contract and everything about the broker.

Topic tree (:mod:`.topics`), wire format and messages (:mod:`.wire`, :mod:`.messages`),
delta codecs (:mod:`.codecs`), model architectures (:mod:`.architecture`), connection settings
(:mod:`.settings`) and a local broker runner (:mod:`.local`). Imports neither the aggregator nor
the edge agent.
"""
