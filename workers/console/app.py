"""The ops console's pages and actions (mounted at ``/ui`` by :func:`sessionq.workers.http.create_app`).

Reading never changes anything; every action is a job or store call that already
exists (dead-letter requeue and purge: :class:`~sessionq.workers.dlq.DeadLetters`;
archive: the ``archive_session`` job; task cancel: :func:`~sessionq.workers.task_admin.cancel_task`).
Blocking work (store, Redis) runs in the thread pool. Filters live in the query
string, so a page's URL is shareable and survives back/forward.
"""

from __future__ import annotations

import heapq
import json
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TextIO, cast
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sessionq.errors import ConfigError, SessionqError
from sessionq.models import Settings, utcnow
from sessionq.models.errors import NotFound, ValidationError
from sessionq.models.kinds import TRANSPORTS
from sessionq.models.records import SESSION_STATUSES
from sessionq.models.settings import is_redis_url
from sessionq.models.store import DEFAULT_SEARCH_SCAN, SessionQuery
from sessionq.models.tasks import TASK_STATUSES
from sessionq.scheduler.lease import DEFAULT_LEASE_KEY
from sessionq.scheduler.sweeps import schedule_for

from ..dlq import DeadLetter, DeadLetters
from ..health import HealthChecker
from ..job_rates import read_rates
from ..logs import redact
from ..queue_state import DEFAULT_NAMESPACE
from ..task_admin import cancel_task, summary
from .auth import ConsoleAuth
from .rendering import HERE, ago, environment

logger = logging.getLogger(__name__)

# Rows per page of sessions, transport sessions and tasks.
PAGE_SIZE = 50
# Dead letters shown at most (the filter narrows them; requeue-all covers every match).
MAX_DEAD_LETTERS_SHOWN = 500
# Messages of a transcript shown per page.
TRANSCRIPT_PAGE = 200
# Minutes the jobs/s and failure rate cover.
RATE_MINUTES = 5
# Seconds since its last heartbeat within which a worker counts as live.
WORKER_LIVE_SECONDS = 60
#: Headers of every page: no framing (clickjacking), nothing loaded or posted off-site, no
#: filter URLs leaked in Referer.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
#: Download formats: URL suffix -> (export format, media type).
DOWNLOADS = {"json": ("json", "application/json"), "md": ("markdown", "text/markdown"), "txt": ("text", "text/plain")}


def parse_when(text: str) -> datetime | None:
    """A filter time: ISO 8601 (``datetime-local`` inputs give ``YYYY-MM-DDTHH:MM``), UTC unless it says otherwise."""
    text = text.strip()
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(f"not a time: {text!r:.40} (use YYYY-MM-DDTHH:MM, UTC)") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def session_query(params: Any) -> SessionQuery:
    """The :class:`SessionQuery` of the sessions page's query string; ValidationError if malformed."""
    pairs: list[tuple[str, str]] = []
    for item in params.getlist("meta"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValidationError(f"metadata filter must be key=value; got {item!r:.40}")
        pairs.append((key.strip(), value.strip()))
    return SessionQuery(
        id_prefix=params.get("id") or None,
        model=params.get("model") or None,
        status=params.get("status") or None,
        metadata=tuple(pairs),
        updated_after=parse_when(params.get("after", "")),
        updated_before=parse_when(params.get("before", "")),
    )


class Console:
    """The console's state: settings, the health checker it shares with the API, the templates."""

    def __init__(self, settings: Settings, health: HealthChecker) -> None:
        self.settings = settings
        self.health = health
        self.auth = ConsoleAuth(settings.api_token)
        self.templates = environment()

    # -- plumbing ------------------------------------------------------------

    def render(self, request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        """Render a template with the CSRF token, the nav and the flash message."""
        csrf, cookie = self.auth.csrf_token(request)
        body = self.templates.get_template(name).render(
            request=request, csrf=csrf, signed_in=self.auth.token is not None, path=request.url.path,
            flash=request.query_params.get("flash", ""), **context,
        )
        response = HTMLResponse(body, status_code=status_code, headers=PAGE_HEADERS)
        if cookie is not None:
            self.auth.set_csrf_cookie(response, cookie, secure=request.url.scheme == "https")
        return response

    def guard(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """Refuse requests that may not see the console; refuse POSTs without a valid CSRF token."""

        async def guarded(request: Request) -> Response:
            if not self.auth.allowed(request):
                if self.auth.token is None:
                    return HTMLResponse("the console answers loopback clients only (no SESSIONQ_API_TOKEN set)",
                                        status_code=403)
                if request.method != "GET":
                    return HTMLResponse("sign in first", status_code=403)
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse("/ui/signin?" + urlencode({"next": target}), status_code=303)
            if request.method == "POST":
                form = await self.auth.form(request)
                if form is None:
                    return HTMLResponse("missing or wrong CSRF token: reload the page and try again", status_code=403)
                request.state.form = form
            return await handler(request)

        return guarded

    @staticmethod
    def back(path: str, flash: str, **params: str) -> Response:
        """Redirect (303) to a console page with a one-line message."""
        query = {k: v for k, v in params.items() if v} | {"flash": flash}
        return RedirectResponse(f"{path}?{urlencode(query)}", status_code=303)

    def _redis(self) -> Any | None:
        return self.health.redis_client

    # -- sign in / out ---------------------------------------------------------

    async def signin(self, request: Request) -> Response:
        """The sign-in form (GET) and its check (POST)."""
        next_url = request.query_params.get("next", "/ui/")
        if not next_url.startswith("/ui/") or next_url.startswith("//"):
            next_url = "/ui/"
        if self.auth.token is None:
            return RedirectResponse("/ui/", status_code=303)
        if request.method == "GET":
            return self.render(request, "signin.html", next=next_url, error="")
        form = await self.auth.form(request)
        if form is None:
            return self.render(request, "signin.html", 403, next=next_url,
                               error="The form expired: enter the token again.")
        if not self.auth.token_matches((form.get("token") or [""])[0]):
            logger.warning("console sign-in refused from %s", request.client.host if request.client else "?")
            return self.render(request, "signin.html", 401, next=next_url, error="Wrong token.")
        response = RedirectResponse(next_url, status_code=303)
        self.auth.sign_in(response, secure=request.url.scheme == "https")
        return response

    async def signout(self, request: Request) -> Response:
        """Clear the session cookie (POST with CSRF)."""
        response = RedirectResponse("/ui/signin", status_code=303)
        self.auth.sign_out(response)
        return response

    # -- overview --------------------------------------------------------------

    def overview_facts(self) -> dict[str, Any]:
        """Everything the overview shows (blocking: run in a thread)."""
        report = self.health.check(counts=False)
        facts: dict[str, Any] = {"report": report, "rates": None, "workers": None, "leader": None, "sweeps": []}
        redis = self._redis()
        now = time.time()
        if redis is not None and report.redis == "ok":
            try:
                facts["rates"] = read_rates(redis, RATE_MINUTES, now)
                leader = redis.get(DEFAULT_LEASE_KEY)
                ttl = redis.pttl(DEFAULT_LEASE_KEY)
                holder = leader.decode() if isinstance(leader, bytes) else leader
                facts["leader"] = (holder, ttl / 1000 if ttl > 0 else None)
            except Exception as exc:  # a Redis hiccup between probes: show what we have
                logger.warning("console overview: %s", redact(str(exc)))
        broker = self.health.broker_client
        if broker is not None and report.broker == "ok":
            try:
                facts["workers"] = int(broker.zcount(f"{DEFAULT_NAMESPACE}:__heartbeats__",
                                                    (now - WORKER_LIVE_SECONDS) * 1000, "+inf"))
            except Exception as exc:
                logger.warning("console overview: %s", redact(str(exc)))
        for kind, interval in schedule_for(self.settings).items():
            run = report.sweeps.get(kind)
            facts["sweeps"].append({"kind": kind, "interval": interval, "run": run,
                                    "next": (int(now // interval) + 1) * interval,
                                    "error": redact(run.error) if run and run.error else ""})
        return facts

    async def overview(self, request: Request) -> Response:
        """Queues, rates, workers, scheduler and sweeps, component health."""
        facts = await run_in_threadpool(self.overview_facts)
        if request.query_params.get("fragment"):
            return self.render(request, "overview_body.html", **facts)
        return self.render(request, "overview.html", **facts)

    # -- dead letters ------------------------------------------------------------

    def _dead_letters(self) -> DeadLetters:
        """The broker's dead letters; ConfigError saying plainly why not when the broker is not Redis."""
        client = self.health.broker_client
        if client is not None:
            return DeadLetters(client)
        url = self.settings.queue_url
        if url is not None and not is_redis_url(url):
            raise ConfigError(
                "the RabbitMQ broker keeps dead letters in its own queues (<queue>.XQ), which this console "
                "cannot list, requeue or purge: use the RabbitMQ management UI or shovel them back"
            )
        return DeadLetters.from_settings(self.settings)  # embedded: raises the one-line reason

    @staticmethod
    def _matches(letter: DeadLetter, actor: str, reason: str) -> bool:
        """The dead-letter filter: this actor (if given), a reason containing ``reason`` (any case)."""
        return (not actor or letter.actor_name == actor) and (not reason or reason.lower() in letter.reason.lower())

    def dead_letter_facts(self, actor: str, reason: str) -> dict[str, Any]:
        """The dead letters matching the filter (at most MAX_DEAD_LETTERS_SHOWN) and the actors seen."""
        try:
            letters = self._dead_letters()
        except SessionqError as exc:
            return {"unavailable": str(exc), "letters": [], "actors": [], "more": False, "total": 0}
        newest: list[tuple[datetime, str, str, DeadLetter]] = []  # a min-heap: the newest matches seen so far
        actors: set[str] = set()
        matched = 0
        for letter in letters:
            actors.add(letter.actor_name)
            if not self._matches(letter, actor, reason):
                continue
            matched += 1
            entry = (letter.dead_lettered_at, letter.queue, letter.id, letter)  # (time, queue, id) is unique
            if len(newest) < MAX_DEAD_LETTERS_SHOWN:
                heapq.heappush(newest, entry)
            else:
                heapq.heappushpop(newest, entry)
        shown = [entry[3] for entry in sorted(newest, key=lambda e: e[:3], reverse=True)]
        return {"unavailable": "", "letters": shown, "actors": sorted(actors), "more": matched > len(shown),
                "total": matched}

    async def dead_letters(self, request: Request) -> Response:
        """The dead-letter list with its filter."""
        actor = request.query_params.get("actor", "")
        reason = request.query_params.get("reason", "")
        facts = await run_in_threadpool(self.dead_letter_facts, actor, reason)
        return self.render(request, "dead_letters.html", actor=actor, reason=reason, **facts)

    async def dead_letter(self, request: Request) -> Response:
        """One dead letter: its payload, secrets redacted."""
        wanted = request.path_params["letter_id"]

        def find() -> DeadLetter | None:
            return next((letter for letter in self._dead_letters() if letter.id == wanted), None)

        try:
            letter = await run_in_threadpool(find)
        except SessionqError as exc:
            return self.render(request, "message.html", 409, title="Dead letters", text=str(exc))
        if letter is None:
            return self.render(request, "message.html", 404, title="Dead letter",
                               text=f"no dead letter {wanted!r} (requeued, purged or expired)")
        payload = redact(json.dumps({"args": letter.args, "kwargs": letter.kwargs or {}}, indent=2,
                                    ensure_ascii=False, default=str))
        return self.render(request, "dead_letter.html", letter=letter, payload=payload)

    async def requeue(self, request: Request) -> Response:
        """Requeue the selected dead letters, or every one matching the filter (``all=1``)."""
        form = request.state.form
        actor, reason = (form.get("actor") or [""])[0], (form.get("reason") or [""])[0]

        def act() -> int:
            letters = self._dead_letters()
            if (form.get("all") or [""])[0]:
                if not actor and not reason:
                    return letters.requeue(None)
                return letters.requeue([letter.id for letter in letters if self._matches(letter, actor, reason)])
            ids = form.get("id") or []
            return letters.requeue(ids) if ids else 0

        try:
            moved = await run_in_threadpool(act)
        except SessionqError as exc:
            return self.back("/ui/dead-letters", str(exc))
        return self.back("/ui/dead-letters", f"requeued {moved} job(s)", actor=actor, reason=reason)

    async def purge(self, request: Request) -> Response:
        """Confirm (GET: how many would go) and purge every dead letter (POST)."""
        if request.method == "GET":
            try:
                count = await run_in_threadpool(lambda: self._dead_letters().count())
            except SessionqError as exc:
                return self.render(request, "message.html", 409, title="Dead letters", text=str(exc))
            return self.render(request, "purge.html", count=count)
        try:
            purged = await run_in_threadpool(lambda: self._dead_letters().purge())
        except SessionqError as exc:
            return self.back("/ui/dead-letters", str(exc))
        return self.back("/ui/dead-letters", f"purged {purged} dead letter(s)")

    # -- sessions ------------------------------------------------------------------

    async def sessions(self, request: Request) -> Response:
        """Search sessions; keyset pages (``cursor``), filters in the URL."""
        params = request.query_params
        error = ""
        page = None
        # datetime-local inputs show only YYYY-MM-DDTHH:MM:SS: a deep link's other ISO forms are shown so.
        when = {name: params.get(name, "") for name in ("after", "before")}
        try:
            query = session_query(params)
            for name, at in (("after", query.updated_after), ("before", query.updated_before)):
                if at is not None:
                    when[name] = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
            page = await run_in_threadpool(self.health.store.search_sessions, query, limit=PAGE_SIZE,
                                           cursor=params.get("cursor") or None)
        except ValidationError as exc:
            error = str(exc)
        filters = [(k, v) for k, v in params.multi_items() if k not in ("cursor", "flash") and v]
        next_url = ""
        if page is not None and page.next_cursor:
            next_url = "/ui/sessions?" + urlencode([*filters, ("cursor", page.next_cursor)])
        first_url = "/ui/sessions?" + urlencode(filters) if params.get("cursor") else ""
        return self.render(request, "sessions.html", error=error, page=page, params=params, next_url=next_url,
                           first_url=first_url, metas=[m for m in params.getlist("meta") if m] or [""],
                           page_size=PAGE_SIZE, scan_limit=DEFAULT_SEARCH_SCAN, when=when,
                           statuses=sorted(SESSION_STATUSES))

    async def session(self, request: Request) -> Response:
        """One session and a page of its transcript (``after`` = last seq shown)."""
        session_id = request.path_params["session_id"]
        try:
            after = max(int(request.query_params.get("after", "0") or 0), 0)
        except ValueError:
            after = 0
        store = self.health.store
        try:
            found = await run_in_threadpool(store.load_session, session_id)
        except NotFound:
            return self.render(request, "message.html", 404, title="Session", text=f"no session {session_id!r}")
        messages = await run_in_threadpool(store.load_messages, session_id, after_seq=after, limit=TRANSCRIPT_PAGE + 1)
        more = len(messages) > TRANSCRIPT_PAGE
        messages = messages[:TRANSCRIPT_PAGE]
        return self.render(request, "session.html", session=found, messages=messages, after=after,
                           next_after=messages[-1].seq if more else None,
                           metadata=json.dumps(found.metadata, indent=2, ensure_ascii=False))

    async def download(self, request: Request) -> Response:
        """A session exported as JSON, Markdown or text (written to a spooled file, then streamed)."""
        session_id, suffix = request.path_params["session_id"], request.path_params["fmt"]
        if suffix not in DOWNLOADS:
            return self.render(request, "message.html", 404, title="Download", text=f"no format {suffix!r}")
        fmt, media = DOWNLOADS[suffix]
        from ..exports import write_export  # the exports module declares its actor: not at import

        spool = tempfile.SpooledTemporaryFile(max_size=1 << 20, mode="w+", encoding="utf-8")  # noqa: SIM115

        def export() -> None:
            write_export(self.health.store, session_id, fmt, cast(TextIO, spool))
            spool.seek(0)

        try:
            await run_in_threadpool(export)
        except NotFound:
            spool.close()
            return self.render(request, "message.html", 404, title="Session", text=f"no session {session_id!r}")

        def chunks() -> Iterator[str]:
            try:
                while chunk := spool.read(64 * 1024):
                    yield chunk
            finally:
                spool.close()

        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in session_id)[:100]
        return StreamingResponse(chunks(), media_type=f"{media}; charset=utf-8",
                                 headers={"Content-Disposition": f'attachment; filename="{safe}.{suffix}"'})

    async def archive(self, request: Request) -> Response:
        """Archive a session through the ``archive_session`` job."""
        session_id = request.path_params["session_id"]
        from ..embedded import run_jobs

        try:
            await run_in_threadpool(run_jobs, self.settings,
                                    [("archive_session", {"session_id": session_id, "at": utcnow().isoformat()})])
        except SessionqError as exc:
            return self.back(f"/ui/sessions/{session_id}", f"archive failed: {exc}")
        done = "archived" if self.settings.queue_url is None else "archive job sent for"
        return self.back(f"/ui/sessions/{session_id}", f"{done} {session_id}")

    # -- MCP -------------------------------------------------------------------------

    async def mcp(self, request: Request) -> Response:
        """Transport sessions and MCP tasks, each in keyset pages."""
        params = request.query_params
        status = params.get("task_status") or None
        if status not in TASK_STATUSES:
            status = None
        store = self.health.store
        transports = await run_in_threadpool(store.list_kind, TRANSPORTS, limit=PAGE_SIZE,
                                             cursor=params.get("tcursor") or None)
        tasks = await run_in_threadpool(store.list_tasks, status=status, limit=PAGE_SIZE,
                                        cursor=params.get("cursor") or None)
        rows = [summary(task) | {"age": ago(task.created_at), "attempts": f"{task.attempt}/{task.max_attempts}",
                                 "cancellable": task.status in ("working", "input_required")}
                for task in tasks.items]
        keep = [(k, v) for k, v in params.multi_items() if k in ("task_status", "tcursor") and v]
        next_tasks = "/ui/mcp?" + urlencode([*keep, ("cursor", tasks.next_cursor)]) if tasks.next_cursor else ""
        keep_t = [(k, v) for k, v in params.multi_items() if k in ("task_status", "cursor") and v]
        next_transports = ("/ui/mcp?" + urlencode([*keep_t, ("tcursor", transports.next_cursor)])
                           if transports.next_cursor else "")
        return self.render(request, "mcp.html", transports=transports.items, tasks=rows, task_status=status or "",
                           task_statuses=sorted(TASK_STATUSES), next_tasks=next_tasks, next_transports=next_transports)

    async def cancel(self, request: Request) -> Response:
        """Cancel an MCP task through the task admin."""
        task_id = request.path_params["task_id"]
        try:
            after = await run_in_threadpool(cancel_task, self.health.store, task_id, redis=self._redis())
        except NotFound as exc:
            return self.back("/ui/mcp", str(exc))
        return self.back("/ui/mcp", f"task {task_id}: {after.status}")


def console_routes(settings: Settings, health: HealthChecker) -> Mount:
    """The console, mounted at ``/ui``."""
    console = Console(settings, health)
    g = console.guard
    return Mount("/ui", routes=[
        Route("/", g(console.overview), name="overview"),
        Route("/signin", console.signin, methods=["GET", "POST"]),
        Route("/signout", g(console.signout), methods=["POST"]),
        Route("/dead-letters", g(console.dead_letters)),
        Route("/dead-letters/requeue", g(console.requeue), methods=["POST"]),
        Route("/dead-letters/purge", g(console.purge), methods=["GET", "POST"]),
        Route("/dead-letters/{letter_id}", g(console.dead_letter)),
        Route("/sessions", g(console.sessions)),
        Route("/sessions/{session_id}", g(console.session)),
        Route("/sessions/{session_id}/export.{fmt}", g(console.download)),
        Route("/sessions/{session_id}/archive", g(console.archive), methods=["POST"]),
        Route("/mcp", g(console.mcp)),
        Route("/mcp/tasks/{task_id}/cancel", g(console.cancel), methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ])
