"""Storage implementations, one module each."""
