"""Group commit for session saves: many jobs, one transaction.

Worker threads hand ``(session, messages)`` to the process's :class:`GroupCommitter`
and block until their write is durable. A single flusher thread takes everything
queued so far (up to ``max_batch``), writes it with one ``store.save_sessions`` call
(one transaction), then releases every waiting thread, which only then lets its job
be acked. While a batch commits, the next one gathers, so under load a commit costs
a fraction of a job instead of one per job. If a batch fails, its writes are retried
one by one so that a bad item fails only its own job.

Once the queue is empty, a batch waits up to ``SESSIONQ_GROUP_COMMIT_DELAY_MS``
(default 2 ms; 0 disables it) for more writes before committing.
"""

from __future__ import annotations

import logging
import os
import time
import queue
import threading
from concurrent.futures import Future
from typing import Sequence

from models import ChatMessage, ChatSession, Store

logger = logging.getLogger(__name__)

# Most writes committed in one transaction.
DEFAULT_MAX_BATCH = 256
# Seconds a batch waits for more writes once the queue is empty (PostgreSQL's
# commit_delay idea): without it, under load a batch held ~2 saves and each
# transaction's fixed cost dominated (see ops/bench, P2). Bounded extra latency.
DEFAULT_GATHER_DELAY = float(os.environ.get("SESSIONQ_GROUP_COMMIT_DELAY_MS", "2") or 0) / 1000

_STOP = object()


class GroupCommitter:
    """Batch concurrent session saves into shared transactions (see the module docs)."""

    def __init__(
        self, store: Store, *, max_batch: int = DEFAULT_MAX_BATCH, gather_delay: float = DEFAULT_GATHER_DELAY
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.gather_delay = gather_delay
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        #: Batches committed and writes in them (for tests and metrics).
        self.batches = 0
        self.writes = 0

    def save(self, session: ChatSession, messages: Sequence[ChatMessage] = (), *, timeout: float | None = None) -> None:
        """Write one session and its messages; return once the batch holding it has committed.

        Raises whatever the store raised for this write.
        """
        future: Future[None] = Future()
        self._ensure_thread()
        self._queue.put((session, list(messages), future))
        future.result(timeout)

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("group committer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sessionq-group-commit", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the flusher once the writes already handed over are committed."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[tuple[ChatSession, list[ChatMessage], Future[None]]] = []
            item = self._queue.get()
            deadline: float | None = None
            while True:
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= self.max_batch or stopping:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    if deadline is None:
                        deadline = time.monotonic() + self.gather_delay
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[tuple[ChatSession, list[ChatMessage], Future[None]]]) -> None:
        try:
            self.store.save_sessions([(session, messages) for session, messages, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0][2].set_exception(exc)
                return
            logger.info("batch of %d saves failed (%s); retrying them one by one", len(batch), exc)
            for session, messages, future in batch:
                try:
                    self.store.save_sessions([(session, messages)])
                except Exception as item_exc:
                    future.set_exception(item_exc)
                else:
                    future.set_result(None)
            return
        self.batches += 1
        self.writes += len(batch)
        for _, _, future in batch:
            future.set_result(None)

