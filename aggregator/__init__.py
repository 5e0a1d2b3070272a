"""Cloud side: the aggregator daemon, aggregation strategies, round state and the model registry."""
