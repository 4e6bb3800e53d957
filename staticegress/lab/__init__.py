"""The local lab: a Kubernetes cluster whose nodes and pods are network namespaces.

Product code: it is the local demo and the bed every e2e test runs on.
"""
