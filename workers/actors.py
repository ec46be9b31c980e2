"""Every actor: the broker (set up first), then every job module.

``dramatiq sessionq.workers.actors`` (and ``sessionq worker``, and the embedded runtime) import
this module, so every actor is declared on the configured broker. The package itself
(``workers``) stays import-light: a producer imports ``sessionq.workers.producer`` without
loading Dramatiq's broker. Importing this module starts no thread.
"""

from __future__ import annotations

from . import broker  # noqa: F401  (must come first: it calls dramatiq.set_broker)
from . import bulk, exports, maintenance, records, sessions, tool_tasks  # noqa: F401

__all__ = ["broker", "bulk", "exports", "maintenance", "records", "sessions", "tool_tasks"]
