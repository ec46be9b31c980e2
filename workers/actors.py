"""Every actor: the broker (set up first), then every job module.

``dramatiq sessionq.workers.actors`` (and ``sessionq worker``, and the embedded runtime) import
this module, so every actor is declared on the configured broker. It is the one module
whose import configures the broker: with the settings of the environment, read now,
unless the process configured one already (``sessionq worker`` with ``--redis-url``,
the embedded runtime). Every lower module (the broker set-up included) builds nothing
and reads no environment when imported. Importing this module starts no thread.
"""

from __future__ import annotations

from sessionq.models import Settings

from . import broker

if not broker.is_configured():
    broker.configure(Settings.load())

# Only now: each job module declares its actors on the broker configured above.
from . import bulk, exports, forget, maintenance, records, sessions, tool_tasks

__all__ = ["broker", "bulk", "exports", "forget", "maintenance", "records", "sessions", "tool_tasks"]
