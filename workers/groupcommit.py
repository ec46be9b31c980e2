"""Group commit for session saves: many jobs, one transaction.

Worker threads hand ``(session, messages)`` to the process's :class:`GroupCommitter`
and block until their write is durable. A single flusher thread takes everything
queued so far (up to ``max_batch``), writes it with one ``store.save_sessions`` call
(one transaction), then releases every waiting thread, which only then lets its job
be acked. While a batch commits, the next one gathers, so under load a commit costs
a fraction of a job instead of one per job. If a batch fails, its writes are retried
one by one so that a bad item fails only its own job.

Once the queue is empty, a batch waits up to ``gather_delay`` (the setting
``group_commit_delay_ms``, ``SESSIONQ_GROUP_COMMIT_DELAY_MS``: 2 ms by default, 0
disables it) for more writes before committing -- unless every
thread that saved recently (within ``SAVER_WINDOW`` seconds) has already handed in
its write: no other write is on its way then, so waiting would only add latency
(each worker thread blocks on its save, so under load the whole pool is in one batch).

Once a batch has committed, and before its threads are released, the flusher hands
the writes' tokens to ``after_commit``: on Redis the worker acks the batch's jobs
there with one round trip (instead of one per job from each thread), still only
after the commit.

The flusher keeps its database connection between batches when the store offers
``hold_connection`` (the SQL store: no pool checkout and liveness ping per batch).
After ``HOLD_IDLE`` seconds without a batch it gives the connection back first, so
that a connection the server dropped while idle is caught by the pool's check.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from sessionq.models import ChatMessage, ChatSession, Store
from sessionq.models.errors import StoreUnavailable

logger = logging.getLogger(__name__)

# Most writes committed in one transaction.
DEFAULT_MAX_BATCH = 256
# Seconds a batch waits for more writes once the queue is empty (PostgreSQL's
# commit_delay idea): without it, under load a batch held ~2 saves and each
# transaction's fixed cost dominated (see ops/bench, P2). Bounded extra latency.
# The workers pass Settings.group_commit_delay_ms instead (same default).
DEFAULT_GATHER_DELAY = 0.002
# A thread that saved within this many seconds counts as a saver whose next write
# a batch may wait for (see the module docs).
SAVER_WINDOW = 0.5
# Seconds without a batch after which the flusher's held connection is returned and
# checked out again (with the pool's liveness check) before the next batch.
HOLD_IDLE = 1.0

_STOP = object()


class _Write:
    """One handed-in write and the lock its thread blocks on until the batch is done."""

    __slots__ = ("done", "error", "messages", "session", "thread", "token")

    def __init__(self, session: ChatSession, messages: list[ChatMessage], token: object) -> None:
        self.session = session
        self.messages = messages
        self.token = token
        self.thread = threading.get_ident()
        self.done = threading.Lock()
        self.done.acquire()
        self.error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        """Record the outcome and wake the waiting thread."""
        self.error = error
        self.done.release()


class GroupCommitter:
    """Batch concurrent session saves into shared transactions (see the module docs)."""

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        gather_delay: float = DEFAULT_GATHER_DELAY,
        after_commit: Callable[[list[object]], None] | None = None,
    ) -> None:
        self.store = store
        #: Called by the flusher with the tokens of the writes just committed, before
        #: their threads are released (the worker acks their jobs in one round trip).
        self.after_commit = after_commit
        self.max_batch = max_batch
        self.gather_delay = gather_delay
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        # Thread id -> monotonic time of its last write (flusher thread only).
        self._savers: dict[int, float] = {}
        #: Batches committed and writes in them (for tests and metrics).
        self.batches = 0
        self.writes = 0

    def save(
        self,
        session: ChatSession,
        messages: Sequence[ChatMessage] = (),
        *,
        timeout: float | None = None,
        token: object = None,
    ) -> None:
        """Write one session and its messages; return once the batch holding it has committed.

        ``token`` (e.g. the job's message) is handed to ``after_commit`` once the write
        has committed. Raises whatever the store raised for this write, or
        :class:`TimeoutError` if ``timeout`` seconds pass first (the write may still be
        committed later).
        """
        write = _Write(session, list(messages), token)
        with self._lock:  # a write handed in after close() would wait behind _STOP forever
            if self._closed:
                raise RuntimeError("group committer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sessionq-group-commit", daemon=True)
                self._thread.start()
            self._queue.put(write)
        if not write.done.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"save of session {session.session_id!r} not committed within {timeout} s")
        if write.error is not None:
            raise write.error

    def close(self) -> None:
        """Stop the flusher once the writes already handed over are committed."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()

    def _run(self) -> None:
        hold: Callable[[], None] | None = getattr(self.store, "hold_connection", None)
        release: Callable[[], None] | None = getattr(self.store, "release_connection", None)
        if hold is None or release is None:
            hold = release = None
        last = time.monotonic()
        try:
            stopping = False
            while not stopping:
                batch, stopping = self._gather()
                if batch:
                    if hold is not None and release is not None:
                        try:
                            if time.monotonic() - last > HOLD_IDLE:
                                release()
                            hold()
                        except Exception as exc:  # the save itself then reports the outage
                            logger.debug("could not hold a connection for the flusher: %s", exc)
                    self._commit(batch)
                    last = time.monotonic()
        finally:
            if release is not None:
                try:
                    release()
                except Exception as exc:  # a broken connection is dropped anyway
                    logger.debug("could not release the flusher's connection: %s", exc)

    def _gather(self) -> tuple[list[_Write], bool]:
        """The next batch, and whether the committer is stopping."""
        batch: list[_Write] = []
        item = self._queue.get()
        savers = self._savers
        now = time.monotonic()
        for thread in [t for t, seen in savers.items() if now - seen > SAVER_WINDOW]:
            del savers[thread]
        expected = len(savers)  # every recent saver's write: no need to wait for more
        threads: set[int] = set()
        deadline: float | None = None
        while True:
            if item is _STOP:
                return batch, True
            write: _Write = item  # type: ignore[assignment]
            batch.append(write)
            threads.add(write.thread)
            savers[write.thread] = now
            if len(batch) >= self.max_batch:
                return batch, False
            try:
                item = self._queue.get_nowait()
                continue
            except queue.Empty:
                pass
            if len(threads) >= expected:
                return batch, False
            if deadline is None:
                deadline = time.monotonic() + self.gather_delay
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return batch, False
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return batch, False

    def _commit(self, batch: list[_Write]) -> None:
        try:
            self.store.save_sessions([(w.session, w.messages) for w in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0].finish(exc)
                return
            logger.info("batch of %d saves failed (%s); retrying them one by one", len(batch), exc)
            done: list[_Write] = []
            for index, write in enumerate(batch):
                try:
                    self.store.save_sessions([(write.session, write.messages)])
                except StoreUnavailable as item_exc:
                    # The store is down, not this write: fail the rest now (their jobs
                    # retry with backoff) instead of one connect timeout per write.
                    for rest in batch[index:]:
                        rest.finish(item_exc)
                    break
                except Exception as item_exc:
                    write.finish(item_exc)
                else:
                    done.append(write)
            self._after_commit(done)
            for write in done:
                write.finish()
            return
        self.batches += 1
        self.writes += len(batch)
        self._after_commit(batch)
        for write in batch:
            write.finish()

    def _after_commit(self, writes: list[_Write]) -> None:
        tokens = [w.token for w in writes if w.token is not None]
        if tokens and self.after_commit is not None:
            try:
                self.after_commit(tokens)
            except Exception as exc:  # the threads then ack their jobs themselves
                logger.warning("early ack of %d committed saves failed: %s", len(tokens), exc)
