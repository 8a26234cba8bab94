"""`qtasks -A tests.faults.worker_app:app run`: the fault app with $QTFAULT_SETTINGS."""

from tests.faults.tasks import build_app, settings_from_env

app = build_app(settings_from_env())
