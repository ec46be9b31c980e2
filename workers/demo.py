"""``sessionq up --demo``: a self-contained tour on the embedded runtime.

In a fresh temporary directory (SQLite store, export dir) it saves sessions through
the in-process queue, appends to one, runs the expiry sweep (which expires a session
idle for three and a half days), exports a session in every format and archives another, then
prints what happened. It needs no service and finishes in seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from sessionq.models import ChatMessage, ChatSession, Settings, utcnow

from .broker import get_store
from .embedded import EmbeddedRuntime
from .producer import Producer

# Worker threads the demo runs.
DEFAULT_DEMO_THREADS = 4


def _conversation(
    session_id: str, lines: list[tuple[str, str]], start: int = 0, *, since: datetime
) -> list[ChatMessage]:
    """Messages ``m{start}``... of a conversation begun at ``since``, message ``n`` at ``since + n`` seconds."""
    return [
        ChatMessage(message_id=f"m{start + i}", session_id=session_id, role=role, content=text,
                    created_at=since + timedelta(seconds=start + i))
        for i, (role, text) in enumerate(lines)
    ]


def run_demo(settings: Settings, echo: Callable[[str], None], *, directory: str | None = None) -> Path:
    """Run the tour, narrating with ``echo``; return the directory holding its files."""
    root = Path(directory or tempfile.mkdtemp(prefix="sessionq-demo-"))
    settings = dataclasses.replace(
        settings,
        storage_url=f"sqlite:///{root / 'sessionq.db'}",
        redis_url=None,
        broker_url=None,
        export_dir=str(root / "exports"),
        outbox_path=str(root / "outbox.db"),
    )
    for name in ("dramatiq", "models", "workers", "scheduler"):
        logging.getLogger(name).setLevel(logging.WARNING)
    echo(f"sessionq demo: embedded mode (in-process queue + worker threads), store {settings.storage_url}")
    runtime = EmbeddedRuntime(settings, threads=DEFAULT_DEMO_THREADS).start()
    producer = Producer(settings)
    try:
        # One clock for every conversation, a minute back, so each message (a second
        # apart, follow-ups included) is in the past and after the one before it.
        now = utcnow() - timedelta(minutes=1)
        old = now - timedelta(days=3, hours=12)
        chats = {
            "demo-weather": ([("user", "What's the weather in Lisbon?"), ("assistant", "Sunny, 24 °C.")], now),
            "demo-code-review": ([("user", "Review my patch, please."), ("assistant", "Looks good; one nit.")], now),
            "demo-stale": ([("user", "Hello?"), ("assistant", "Hi! (nobody came back)")], old),
        }
        echo("\n1. save: three sessions enqueued on the 'sessions' queue (the caller returns at once)")
        for session_id, (lines, since) in chats.items():
            messages = _conversation(session_id, lines, since=since)
            at = messages[-1].created_at
            session = ChatSession(session_id=session_id, model="demo-model", created_at=messages[0].created_at,
                                  updated_at=at, metadata={"source": "sessionq up --demo"})
            job = producer.save_session(session, messages)
            echo(f"   save_session {session_id:<17} {len(messages)} messages   job {job}")
        # The follow-up waits for the first save: messages are stored in arrival order.
        runtime.join(30)
        more = _conversation("demo-weather", [("user", "And tomorrow?"), ("assistant", "Clouds, 19 °C.")], 2, since=now)
        job = producer.append_messages("demo-weather", more)
        echo(f"   append_messages demo-weather  {len(more)} messages   job {job}")
        producer.save_session(ChatSession(session_id="demo-weather", model="demo-model", created_at=now,
                                          updated_at=more[-1].created_at, metadata={"source": "sessionq up --demo"}),
                              more)
        echo("   (the same messages sent twice: stored once — every job is idempotent)")
        runtime.join(30)
        store = get_store()
        for session_id in chats:
            s = store.load_session(session_id)
            echo(f"   stored {s.session_id:<17} status={s.status:<8} messages={s.message_count}")

        echo("\n2. sweep: run_sweep('expire_sessions') on the 'maintenance' queue "
             f"(idle > {settings.expiry_hours:g} h)")
        producer.run_sweep("expire_sessions")
        runtime.join(30)
        from sessionq.scheduler.status import SweepBook

        last = SweepBook().last("expire_sessions")
        counts = ", ".join(f"{k}={v}" for k, v in (last.counts if last else {}).items())
        echo(f"   sweep result: {counts or 'not run'}; demo-stale is now {store.load_session('demo-stale').status}")

        echo("\n3. export and archive: export_session on the 'bulk' queue, archive_session on 'maintenance'")
        for fmt in ("json", "markdown", "text"):
            producer.export("demo-weather", fmt)
        producer.archive("demo-code-review")
        runtime.join(30)
        for path in sorted((root / "exports").iterdir()):
            echo(f"   wrote {path} ({path.stat().st_size} bytes)")
        echo(f"   demo-code-review is now {store.load_session('demo-code-review').status}")

        stats = store.stats().to_json()
        echo(f"\nstore totals: {stats['total_sessions']} sessions ({stats['active_sessions']} active, "
             f"{stats['archived_sessions']} archived, {stats['expired_sessions']} expired), "
             f"{stats['total_messages']} messages; dead letters: {len(runtime.dead_letters())}")
        preview = (root / "exports" / "demo-weather.md").read_text(encoding="utf-8").splitlines()[:8]
        echo("\nexports/demo-weather.md begins:\n   " + "\n   ".join(preview))
    finally:
        producer.close()
        runtime.stop()
    echo(f"\ndone. Files kept in {root}. Next: `sessionq up` (embedded), or set REDIS_URL and run `sessionq worker`.")
    return root
