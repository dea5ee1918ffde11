"""nstrace: follow a packet through namespaces, bridges, routing and netfilter."""

__version__ = "0.1.0"
