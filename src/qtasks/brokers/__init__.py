"""Broker implementations, one module each; pick one by URL scheme or pass an instance."""
