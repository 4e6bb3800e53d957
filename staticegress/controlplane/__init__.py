"""Control-plane layer: builds, finds and runs etcd and the Kubernetes control plane locally.

Used by the test suite and by the local lab; never by the agent or the manager.
"""
