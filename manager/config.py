"""Where things are: the state directory, the broker, the Celery app.

With nothing configured, everything lives under one local state directory:
a kombu ``filesystem://`` broker (no server needed; broadcast and events
work across processes) and a SQLite store. ``-A proj`` loads the user's
Celery app and its broker; ``--broker URL`` works without one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from celery import Celery

from manager.errors import ConfigurationError

logger = logging.getLogger(__name__)

STATE_DIR_ENV = "CMPOLICY_STATE_DIR"
# 0.05 s gives control round trips of about 50 ms; the transport's default
# of 1 s makes every broadcast take a second.
FILESYSTEM_POLLING_INTERVAL_S = 0.05
# kombu's filesystem transport with atomic message files (see fstransport).
FILESYSTEM_TRANSPORT = "manager.fstransport:Transport"


def default_state_dir() -> Path:
    """``$CMPOLICY_STATE_DIR``, else ``$XDG_STATE_HOME/celery-policy-manager``."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "celery-policy-manager"


def filesystem_transport_options(state_dir: str | Path) -> dict:
    """Options for kombu's filesystem transport under ``state_dir``.

    Workers, the manager and every publisher must use the same folders.
    """
    root = Path(state_dir) / "broker"
    data, control = root / "data", root / "control"
    for folder in (data, control):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(data),
        "data_folder_out": str(data),
        "control_folder": str(control),
        "processed_folder": str(root / "processed"),
        "store_processed": False,
        "polling_interval": FILESYSTEM_POLLING_INTERVAL_S,
    }


def configure_broker(app: Celery, broker: str | None,
                     state_dir: str | Path) -> Celery:
    """Point ``app`` at ``broker``, or at the embedded default."""
    url = broker or "filesystem://"
    app.conf.broker_url = url
    if url.startswith("filesystem://"):
        app.conf.broker_transport = FILESYSTEM_TRANSPORT
        options = dict(app.conf.broker_transport_options or {})
        options.update(filesystem_transport_options(state_dir))
        app.conf.broker_transport_options = options
    return app


def load_app(app_path: str | None, broker: str | None,
             state_dir: str | Path) -> Celery:
    """The user's Celery app (``-A proj``), or one built for ``broker``."""
    if app_path:
        from celery.app.utils import find_app
        try:
            app = find_app(app_path)
        except Exception as exc:  # import errors of the user's module vary
            raise ConfigurationError(f"cannot load the Celery app"
                                     f" {app_path!r}: {exc}") from exc
        if broker:
            configure_broker(app, broker, state_dir)
        elif (app.conf.broker_url or "").startswith("filesystem://") and \
                not (app.conf.broker_transport_options or {}).get(
                    "control_folder"):
            configure_broker(app, None, state_dir)
        return app
    app = Celery("cmpolicy", set_as_current=False)
    return configure_broker(app, broker, state_dir)
