"""Connections kept per event loop (pure logic: the connections are plain objects)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from sessionq.models.loop_connections import LoopConnections


class Conns:
    """Numbered stand-in connections, recording which were opened and discarded."""

    def __init__(self) -> None:
        self.numbers = itertools.count(1)
        self.opened: list[int] = []
        self.discarded: list[int] = []

    async def connect(self) -> int:
        self.opened.append(next(self.numbers))
        return self.opened[-1]

    def discard(self, conn: int) -> None:
        self.discarded.append(conn)


def test_a_connection_is_reused_bounded_and_dropped_after_an_error() -> None:
    made = Conns()
    conns = LoopConnections(made.connect, made.discard, limit=2)

    async def borrow(hold: float) -> int:
        async with conns.lent() as conn:
            await asyncio.sleep(hold)
            return conn

    async def scenario() -> None:
        # One call after another reuses one connection
        assert [await borrow(0), await borrow(0)] == [1, 1]
        # Five at once share at most two
        assert set(await asyncio.gather(*(borrow(0.01) for _ in range(5)))) == {1, 2}
        assert made.opened == [1, 2]
        # A block that raises discards its connection; the next call opens a new one
        with pytest.raises(RuntimeError):
            async with conns.lent():
                raise RuntimeError("protocol out of step")
        (gone,) = made.discarded
        # and two at once then use the one left and a new one
        assert set(await asyncio.gather(borrow(0.01), borrow(0.01))) == {1, 2, 3} - {gone}

    asyncio.run(scenario())
    # And another event loop opens its own connection (the closed loop's are forgotten)
    opened = len(made.opened)
    assert asyncio.run(borrow(0)) == opened + 1
