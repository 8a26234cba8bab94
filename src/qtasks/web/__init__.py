"""The web dashboard: `create_app(core)` is a Starlette app; `qtasks -A module:app web` serves it.

Needs the `web` extra (Starlette and uvicorn): `pip install 'qtasks[web]'`. The name loads
on first use, so importing `qtasks.web` never fails without the extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qtasks.web.app import create_app

INSTALL_HINT = "the dashboard needs Starlette and uvicorn: pip install 'qtasks[web]'"


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from qtasks.web.app import create_app

        return create_app
    raise AttributeError(f"module 'qtasks.web' has no attribute {name!r}")


__all__ = ["INSTALL_HINT", "create_app"]
