"""Kubernetes layer: API clients, CRD installation, reflectors and status writers."""
