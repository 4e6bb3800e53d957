"""staticegress: fixed, predictable source IPs for chosen workloads' traffic leaving a cluster."""

__version__ = "0.1.0"
