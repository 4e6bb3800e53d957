"""Model layer: pure computation of desired state from a validated snapshot. No I/O."""
