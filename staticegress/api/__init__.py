"""API layer: the StaticEgressIP and StaticEgressIPPool resources' pydantic parsers,
the core objects' parsers, and the frozen internal types they produce.

Pure: no I/O. Everything above this layer receives validated, immutable values.
"""
