"""The shared core that every stage builds on: I/O, data, networks, losses, metrics, training."""
