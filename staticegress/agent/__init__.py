"""The node agent: watches the cluster, computes this node's desired dataplane, applies it."""
