"""fedmq: federated learning for edge fleets over MQTT."""

__version__ = "0.1.0"
