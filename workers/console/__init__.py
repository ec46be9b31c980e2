"""The ops web console under ``/ui`` (issue 19): server-rendered pages over the same
store, broker and health checks the API uses. See :mod:`sessionq.workers.console.app`."""

from .app import console_routes

__all__ = ["console_routes"]
