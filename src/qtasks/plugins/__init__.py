"""Plugins and the built-in injections: triggers, `Depends`, `State`, argument validation.

    from qtasks.plugins import AsyncState, Depends, Scope
    from qtasks.plugins.base import BasePlugin

See `qtasks.plugins.triggers` (and docs/triggers.md) for every trigger.
"""

from qtasks.errors import PluginError, TaskPluginTriggerError
from qtasks.plugins.base import BasePlugin, PluginRegistry
from qtasks.plugins.depends import DependencyScope, Depends, Scope
from qtasks.plugins.state import AsyncState, AsyncStateLock, SyncState, SyncStateLock
from qtasks.plugins.triggers import TRIGGERS, OnError, TriggerSpec
from qtasks.plugins.validation import ValidationFailed

__all__ = [
    "TRIGGERS",
    "AsyncState",
    "AsyncStateLock",
    "BasePlugin",
    "DependencyScope",
    "Depends",
    "OnError",
    "PluginError",
    "PluginRegistry",
    "Scope",
    "SyncState",
    "SyncStateLock",
    "TaskPluginTriggerError",
    "TriggerSpec",
    "ValidationFailed",
]
