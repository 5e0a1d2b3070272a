"""Device side: the agent daemon, local training backends, data sources and the outbox."""
