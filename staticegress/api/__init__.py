"""API layer: the StaticEgressIP resource's pydantic parser and its frozen internal types.

Pure: no I/O. Everything above this layer receives validated, immutable values.
"""
