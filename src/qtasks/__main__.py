"""`python -m qtasks`: the same command line as the `qtasks` script."""

from __future__ import annotations

from qtasks.cli.main import entrypoint

if __name__ == "__main__":
    entrypoint()
