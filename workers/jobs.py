"""THE job table: each job's name, its queue, and how its argument is checked and
written in canonical form.

Everything that needs to know a job reads it here: the actors (their queue, through
:func:`job_actor`), the producer (queue, validation, canonical JSON, the plain fast
path), the wire encoding (the envelope of each job), the broker and the queue readers
(:data:`QUEUES`), the CLI's ``--queues``. The checks themselves are the ``parse_*``
functions of :mod:`sessionq.workers.payloads`, which each actor runs on receipt:
a job's canonical form is what its parser accepted, written back as JSON.

Import-light: the producer and the MCP integration import this module without
loading the broker (:mod:`sessionq.workers.broker`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, overload

import dramatiq

from . import payloads
from .errors import InvalidPayload, SessionForgotten
from .producer_plain import plain_append, plain_save

P = ParamSpec("P")
R = TypeVar("R")

#: ``normalize(argument, export_dir)``: the argument checked exactly as the actor will
#: check it and written in canonical JSON form (datetimes as ISO 8601 text in UTC);
#: raises InvalidPayload. Only ``export_session`` reads the export directory.
Normalize = Callable[[Any, "str | Path"], Any]


@dataclass(frozen=True, slots=True)
class Job:
    """One job: the actor's name, the queue it consumes, its canonical form."""

    name: str
    queue: str
    normalize: Normalize
    #: A fast validator for the producer: the canonical form of a plainly valid payload,
    #: exactly what :attr:`normalize` returns, or None to step aside (anything unusual,
    #: a bad payload included). Kept only where it pays for itself (see producer_plain).
    plain: Callable[[Any], Any] | None = None
    #: True when the canonical form is the job's own copy of the caller's payload (up to
    #: the values of its metadata, which :func:`~sessionq.workers.producer_plain.deferred_bound`
    #: checks or snapshots), so that a buffered job may be encoded later by the producer's flusher.
    deferrable: bool = False


def _save(arg: Any, export_dir: str | Path) -> Any:
    return payloads.save_payload(*payloads.parse_save(arg))


def _append(arg: Any, export_dir: str | Path) -> Any:
    session_id, messages = payloads.parse_append(arg)
    return {"session_id": session_id, "messages": [payloads.message_payload(m) for m in messages]}


def _heartbeat(arg: Any, export_dir: str | Path) -> Any:
    mcp_session_id, at = payloads.parse_heartbeat(arg)
    return {"mcp_session_id": mcp_session_id, "at": at.isoformat()}


def _disconnect(arg: Any, export_dir: str | Path) -> Any:
    mcp_session_id, at, grace = payloads.parse_disconnect(arg)
    out: dict[str, Any] = {"mcp_session_id": mcp_session_id, "at": at.isoformat()}
    if grace is not None:
        out["grace_seconds"] = grace
    return out


def _archive(arg: Any, export_dir: str | Path) -> Any:
    session_id, at = payloads.parse_archive(arg)
    return {"session_id": session_id, "at": at.isoformat()}


def _sweep(arg: Any, export_dir: str | Path) -> Any:
    return payloads.parse_sweep(arg)


def _export(arg: Any, export_dir: str | Path) -> Any:
    # The path stays as given (relative to the workers' export dir, not the producer's).
    payloads.parse_export(arg, export_dir)
    return dict(arg)


def _forget(arg: Any, export_dir: str | Path) -> Any:
    receipt_id, selector = payloads.parse_forget(arg)
    return {"receipt_id": receipt_id, **selector.to_payload()}


def _tool_task(arg: Any, export_dir: str | Path) -> Any:
    task_id, leg = payloads.parse_tool_task(arg)
    return {"task_id": task_id, "leg": leg}


def _record(parse: Callable[[Any], Any]) -> Normalize:
    """The canonical form of a job whose payload is one record: its ``to_json``."""
    return lambda arg, export_dir: parse(arg).to_json()


def _table(*jobs: Job) -> Mapping[str, Job]:
    return {job.name: job for job in jobs}


#: Every job by name, grouped by queue: saves never wait behind maintenance or bulk work.
JOBS: Mapping[str, Job] = _table(
    Job("save_session", "sessions", _save, plain=plain_save, deferrable=True),
    Job("append_messages", "sessions", _append, plain=plain_append, deferrable=True),
    # No plain path: measured no faster than the general one (3.01 vs 3.06 µs per call).
    Job("heartbeat", "sessions", _heartbeat, deferrable=True),
    Job("mark_disconnected", "sessions", _disconnect),
    Job("register_transport", "sessions", _record(payloads.parse_register_transport)),
    Job("archive_session", "maintenance", _archive),
    Job("run_sweep", "maintenance", _sweep),
    Job("save_file", "maintenance", _record(payloads.parse_file)),
    Job("put_agent_state", "maintenance", _record(payloads.parse_agent_state)),
    # Erasure with a receipt (sessionq.workers.forget): rare, and never behind bulk work.
    Job("forget", "maintenance", _forget),
    Job("export_session", "bulk", _export),
    Job("migrate_batch", "bulk", _record(payloads.parse_migrate_batch)),
    # One key range of a sealed table re-sealed under the primary key (sessionq keys rotate).
    Job("rotate_batch", "bulk", _record(payloads.parse_rotate_batch)),
    # One leg of an MCP task; consumed only by workers started with --mcp-app.
    Job("run_tool_task", "tasks", _tool_task),
)

#: The queues, in the table's order (the order a worker's queues are declared in).
QUEUES: tuple[str, ...] = tuple(dict.fromkeys(job.queue for job in JOBS.values()))


def job_named(name: str) -> Job:
    """The job called ``name``; InvalidPayload naming the known jobs if there is none."""
    job = JOBS.get(name)
    if job is None:
        raise InvalidPayload(f"unknown job {name!r:.80}; known: {', '.join(sorted(JOBS))}")
    return job


def single_argument(name: str, args: Sequence[Any]) -> Any:
    """The one argument every job takes; InvalidPayload for any other count."""
    if len(args) != 1:
        raise InvalidPayload(f"{name} takes exactly one argument, got {len(args)}")
    return args[0]


def normalize(name: str, args: Sequence[Any], export_dir: str | Path = ".") -> Any:
    """Check a job's arguments exactly as its actor will and return its one argument in
    canonical JSON form (datetimes as ISO strings); raise InvalidPayload if bad."""
    job = job_named(name)
    return job.normalize(single_argument(name, args), export_dir)


@overload
def job_actor(fn: Callable[P, R], /) -> dramatiq.Actor[P, R]: ...


@overload
def job_actor(
    *, throws: tuple[type[BaseException], ...] = (), **options: Any
) -> Callable[[Callable[P, R]], dramatiq.Actor[P, R]]: ...


def job_actor(
    fn: Callable[P, R] | None = None, /, *, throws: tuple[type[BaseException], ...] = (), **options: Any
) -> Any:
    """Declare ``fn`` as the actor of the job of the same name, on that job's queue; an
    :class:`InvalidPayload` (or one of ``throws``) dead-letters the message at once (never
    retried), and so does a :class:`SessionForgotten` (a write for an erased session).
    ``@job_actor`` or ``@job_actor(time_limit=..., ...)`` (Dramatiq actor options).

    Call it from a job module only, after :mod:`sessionq.workers.broker` is imported
    (Dramatiq declares the actor on the current broker).
    """

    def declare(f: Callable[P, R]) -> dramatiq.Actor[P, R]:
        queue = job_named(f.__name__).queue
        return dramatiq.actor(queue_name=queue, throws=(InvalidPayload, SessionForgotten, *throws), **options)(f)

    return declare(fn) if fn is not None else declare
