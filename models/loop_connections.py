"""Connections kept per event loop, each lent to one coroutine at a time.

For one hot statement sent from asyncio code (a new task's ``INSERT``, its leg's
``EVALSHA``): the drivers' own pools cost more CPU per call than the round trip
itself (asyncpg's pool: acquire timeouts and a reset query on release; redis-py's
asyncio client: command machinery and a pool lock), so a coroutine borrows an idle
connection of its loop, or opens one, and gives it back. A connection that was in use
when an error happened is discarded (its protocol may be out of step).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

C = TypeVar("C")

# Idle connections kept per event loop (more are opened under concurrency, then closed).
DEFAULT_KEEP = 8


class LoopConnections(Generic[C]):
    """``async with conns.lent() as conn``: an idle connection of the running loop (or
    a new one from ``connect``); ``discard`` closes one without waiting (it runs on the
    connection's loop)."""

    def __init__(self, connect: Callable[[], Awaitable[C]], discard: Callable[[C], None], *,
                 keep: int = DEFAULT_KEEP) -> None:
        self.connect = connect
        self.discard = discard
        self.keep = keep
        self._idle: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[C]] = weakref.WeakKeyDictionary()

    @asynccontextmanager
    async def lent(self) -> AsyncIterator[C]:
        """Borrow a connection for one exchange (discarded if the block raises)."""
        idle = self._idle.setdefault(asyncio.get_running_loop(), [])
        conn = idle.pop() if idle else await self.connect()
        try:
            yield conn
        except BaseException:
            self.discard(conn)
            raise
        if len(idle) < self.keep:
            idle.append(conn)
        else:
            self.discard(conn)

    def close(self) -> None:
        """Discard every idle connection, each on its own loop (thread-safe)."""
        for loop, idle in list(self._idle.items()):
            conns, idle[:] = list(idle), []
            for conn in conns:
                if loop.is_closed():
                    continue
                try:
                    loop.call_soon_threadsafe(self.discard, conn)
                except RuntimeError:  # the loop closed meanwhile: its connections went with it
                    pass
        self._idle.clear()
