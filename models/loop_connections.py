"""Connections kept per event loop, each lent to one coroutine at a time.

For one hot statement sent from asyncio code (a new task's ``INSERT``, its leg's
``EVALSHA``): the drivers' own pools cost more CPU per call than the round trip
itself (asyncpg's pool: acquire timeouts and a reset query on release; redis-py's
asyncio client: command machinery and a pool lock), so a coroutine borrows an idle
connection of its loop, or opens one (at most ``limit`` per loop), and gives it back.
A connection that was in use when an error happened is discarded (its protocol may be
out of step).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

C = TypeVar("C")

# Connections open at most per event loop (a coroutine beyond waits for one).
DEFAULT_LIMIT = 8


class LoopConnections(Generic[C]):
    """``async with conns.lent() as conn``: an idle connection of the running loop, a new
    one from ``connect`` while fewer than ``limit`` are open, else the next one given
    back. ``discard`` closes one without waiting (it runs on the connection's loop)."""

    def __init__(self, connect: Callable[[], Awaitable[C]], discard: Callable[[C], None], *,
                 limit: int = DEFAULT_LIMIT) -> None:
        self.connect = connect
        self.discard = discard
        self.limit = limit
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[list[C], asyncio.Semaphore]] = (
            weakref.WeakKeyDictionary())

    @asynccontextmanager
    async def lent(self) -> AsyncIterator[C]:
        """Borrow a connection for one exchange (discarded if the block raises)."""
        idle, free = self._of(asyncio.get_running_loop())
        async with free:
            conn = idle.pop() if idle else await self.connect()
            try:
                yield conn
            except BaseException:
                self.discard(conn)
                raise
            idle.append(conn)

    def _of(self, loop: asyncio.AbstractEventLoop) -> tuple[list[C], asyncio.Semaphore]:
        state = self._loops.get(loop)
        if state is None:
            for old in [old for old in self._loops if old.is_closed()]:  # their connections went with them
                del self._loops[old]
            state = self._loops[loop] = ([], asyncio.Semaphore(self.limit))
        return state

    def close(self) -> None:
        """Discard every idle connection, each on its own loop (thread-safe)."""
        for loop, (idle, _) in list(self._loops.items()):
            conns, idle[:] = list(idle), []
            for conn in conns:
                if loop.is_closed():
                    continue
                try:
                    loop.call_soon_threadsafe(self.discard, conn)
                except RuntimeError:  # the loop closed meanwhile: its connections went with it
                    pass
        self._loops.clear()
