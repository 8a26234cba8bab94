"""GlobalConfig implementations, one module each."""
