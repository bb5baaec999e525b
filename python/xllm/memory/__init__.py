"""Memory: probes of RAM and GPUs (and later the load planner)."""
