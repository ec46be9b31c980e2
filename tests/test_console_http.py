"""The ops console over plain HTTP (no browser): who gets in, CSRF, and what each page
shows, against the real PostgreSQL store and Redis. The browser walk-through is in
tests/test_console_browser.py."""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from sessionq.models import Settings, Store, TransportSession, utcnow
from sessionq.models.tasks import McpTask, new_task_id
from sessionq.workers.http import create_app
from sessionq.workers.job_rates import RateRecorder, read_rates
from tests.conftest import POSTGRES_URL, REDIS_URL, T0, messages, session
from tests.support_http import ServerThread
from tests.support_jobs import push_raw

TOKEN = "console-test-token-0123456789"


def settings(**overrides: Any) -> Settings:
    """Settings for the isolated services, with the test token."""
    values: dict[str, Any] = {"storage_url": POSTGRES_URL, "redis_url": REDIS_URL, "api_token": TOKEN}
    values.update(overrides)
    return Settings(**values)


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def sign_in(client: httpx.Client) -> None:
    """Sign ``client`` in through the form."""
    page = client.get("/ui/signin")
    answer = client.post("/ui/signin?next=/ui/sessions", data={"csrf": csrf_of(page.text), "token": TOKEN})
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/sessions"


def dead_letter(client: Any, *, actor: str = "append_messages", arg: Any = None) -> str:
    """Dead-letter one message the way Dramatiq does; return its Redis id."""
    push_raw(client, [(actor, arg if arg is not None else {"session_id": "nope", "messages": []})])
    rid = client.lpop("dramatiq:sessions").decode()
    data = json.loads(client.hget("dramatiq:sessions.msgs", rid))
    data["options"].update(dead_letter_reason="SessionNotReady: session 'nope' does not exist (yet)", retries=2)
    client.hdel("dramatiq:sessions.msgs", rid)
    client.zadd("dramatiq:sessions.XQ", {rid: time.time() * 1000})
    client.hset("dramatiq:sessions.XQ.msgs", rid, json.dumps(data))
    return rid


@pytest.fixture
def server(pg_store: Store, redis_client: Any) -> Any:
    with ServerThread(create_app(settings(), store=pg_store, redis_client=redis_client)) as running:
        yield running


def test_pages_need_sign_in_and_the_cookie_is_httponly_strict(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url) as client:
        for path in ("/ui/", "/ui/sessions?status=active", "/ui/dead-letters", "/ui/mcp"):
            answer = client.get(path)
            assert answer.status_code == 303
            assert answer.headers["location"].startswith("/ui/signin?next=")
        wrong = client.post("/ui/signin", data={"csrf": csrf_of(client.get("/ui/signin").text), "token": "guess"})
        assert wrong.status_code == 401 and "Wrong token" in wrong.text
        page = client.get("/ui/signin")
        answer = client.post("/ui/signin?next=/ui/mcp", data={"csrf": csrf_of(page.text), "token": TOKEN})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/mcp"
        cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("sessionq_console="))
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        page = client.get("/ui/mcp")
        assert page.status_code == 200
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        # A tampered cookie is no sign-in.
        value = client.cookies.get("sessionq_console") or ""
        client.cookies.set("sessionq_console", value[:-2] + ("AA" if not value.endswith("AA") else "BB"), path="/ui")
        assert client.get("/ui/mcp").status_code == 303


def test_sign_in_never_redirects_off_the_console(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url) as client:
        page = client.get("/ui/signin")
        answer = client.post("/ui/signin?next=//evil.example/", data={"csrf": csrf_of(page.text), "token": TOKEN})
        assert answer.headers["location"] == "/ui/"


def test_forged_posts_without_the_csrf_token_are_refused(server: ServerThread, redis_client: Any) -> None:
    rid = dead_letter(redis_client)
    with httpx.Client(base_url=server.url) as client:
        sign_in(client)
        forged = [
            {"id": rid},  # no token
            {"id": rid, "csrf": "made-up"},  # a token that is not this client's
        ]
        for form in forged:
            answer = client.post("/ui/dead-letters/requeue", data=form)
            assert answer.status_code == 403 and "CSRF" in answer.text
        assert client.post("/ui/dead-letters/purge", data={}).status_code == 403
        # Another browser's valid token does not work with this client's cookie either.
        with httpx.Client(base_url=server.url) as other:
            other_token = csrf_of(other.get("/ui/signin").text)
        assert client.post("/ui/dead-letters/requeue", data={"id": rid, "csrf": other_token}).status_code == 403
        assert redis_client.zscore("dramatiq:sessions.XQ", rid) is not None  # nothing happened
        # The page's own token works.
        token = csrf_of(client.get("/ui/dead-letters").text)
        done = client.post("/ui/dead-letters/requeue", data={"id": rid, "csrf": token})
        assert done.status_code == 303 and "requeued+1+job" in done.headers["location"]
    assert redis_client.zscore("dramatiq:sessions.XQ", rid) is None
    assert redis_client.lrange("dramatiq:sessions", 0, -1) == [rid.encode()]


def test_without_a_token_only_loopback_clients_get_in(pg_store: Store, redis_client: Any) -> None:
    app = create_app(settings(api_token=None), store=pg_store, redis_client=redis_client)
    with TestClient(app, client=("203.0.113.7", 40000), follow_redirects=False) as remote:
        assert remote.get("/ui/").status_code == 403
        assert remote.get("/ui/sessions").status_code == 403
        assert remote.post("/ui/dead-letters/purge", data={}).status_code == 403
    with TestClient(app, client=("127.0.0.1", 40000), follow_redirects=False) as local:
        assert local.get("/ui/").status_code == 200
        assert local.get("/ui/signin").status_code == 303  # nothing to sign in to
        assert local.post("/ui/dead-letters/purge", data={}).status_code == 403  # CSRF still applies


def test_dead_letter_payload_is_shown_with_secrets_redacted(server: ServerThread, redis_client: Any) -> None:
    arg = {"session_id": "nope", "messages": [], "metadata": {"note": "password=hunter2 token: abc123def"}}
    rid = dead_letter(redis_client, arg=arg)
    with httpx.Client(base_url=server.url) as client:
        sign_in(client)
        listing = client.get("/ui/dead-letters?actor=append_messages&reason=notready")
        assert rid in listing.text and "SessionNotReady" in listing.text
        assert rid not in client.get("/ui/dead-letters?reason=something-else").text
        page = client.get(f"/ui/dead-letters/{rid}")
        assert page.status_code == 200
        assert "hunter2" not in page.text and "abc123def" not in page.text
        assert "password=***" in page.text and "nope" in page.text
        assert "<dt>Attempts</dt><dd>2</dd>" in page.text  # Dramatiq's retries option counts failed deliveries


def test_session_search_deep_link_keyset_pages_and_downloads(server: ServerThread, pg_store: Store) -> None:
    for i in range(60):
        pg_store.save_session(session(f"s{i:03d}", at=T0.replace(minute=i % 60), metadata={"team": f"t{i % 3}"}),
                              messages(f"s{i:03d}", 2))
    with httpx.Client(base_url=server.url) as client:
        sign_in(client)
        first = client.get("/ui/sessions", params={"meta": "team=t1"})
        ids = re.findall(r'href="/ui/sessions/(s\d+)"', first.text)
        assert ids == [f"s{i:03d}" for i in range(58, -1, -3)]  # 20 matches, newest first, one page
        assert 'rel="next"' not in first.text
        everyone = client.get("/ui/sessions")
        assert len(re.findall(r'href="/ui/sessions/(s\d+)"', everyone.text)) == 50
        found = re.search(r'href="([^"]+)" rel="next"', everyone.text)
        assert found is not None
        older = found.group(1).replace("&amp;", "&")
        rest = re.findall(r'href="/ui/sessions/(s\d+)"', client.get(older).text)
        assert rest == [f"s{i:03d}" for i in range(9, -1, -1)]
        bad = client.get("/ui/sessions", params={"meta": "team"})
        assert bad.status_code == 200 and "key=value" in bad.text
        markdown = client.get("/ui/sessions/s007/export.md")
        assert markdown.status_code == 200 and markdown.text.startswith("# Session s007")
        assert 'filename="s007.md"' in markdown.headers["content-disposition"]
        as_json = client.get("/ui/sessions/s007/export.json").json()
        assert as_json["session_id"] == "s007" and len(as_json["messages"]) == 2
        assert client.get("/ui/sessions/missing/export.md").status_code == 404


def test_job_rates_add_up_across_recorders(redis_client: Any) -> None:
    now = time.time()
    first, second = RateRecorder(redis_client), RateRecorder(redis_client)
    for _ in range(6):
        first.count("ok", at=now)
    second.count("ok", at=now - 60)
    second.count("dead", at=now - 60)
    second.count("retry", at=now - 600)  # outside a five-minute window
    first.flush()
    second.flush()
    second.flush()  # nothing pending: adds nothing
    rates = read_rates(redis_client, 5, now)
    assert rates.by_outcome == {"ok": 7, "dead": 1}
    assert rates.failure_rate == pytest.approx(1 / 8)
    assert 240 < rates.seconds <= 300 and rates.per_second == pytest.approx(8 / rates.seconds)


def test_mcp_page_lists_tasks_and_transports_and_cancels_through_the_task_admin(
    server: ServerThread, pg_store: Store, redis_client: Any
) -> None:
    then = utcnow() - timedelta(hours=1)
    queued = pg_store.create_task(McpTask(new_task_id(), "tool_queued", owner="owner-digest-0123456789abcdef",
                                          created_at=then, lease_until=then, expires_at=then + timedelta(days=1)))
    done = pg_store.create_task(McpTask(new_task_id(), "tool_done", owner="o", created_at=then, lease_until=then,
                                        expires_at=then + timedelta(days=1)))
    pg_store.claim_task(done.task_id, 0, "w1", then, then + timedelta(seconds=30))
    pg_store.finish_task(done.task_id, "w1", then, result={"content": []})
    pg_store.register_transport(TransportSession("mcp-live", created_at=T0, last_heartbeat=T0))
    with httpx.Client(base_url=server.url) as client:
        sign_in(client)
        page = client.get("/ui/mcp")
        assert "mcp-live" in page.text and "tool_queued" in page.text and "owner-digest" in page.text
        assert "owner-digest-0123456789abcdef" not in page.text  # the owner hash is shortened
        assert client.get("/ui/mcp?task_status=completed").text.count("tool_") == 1
        # A finished task offers no cancel; the queued one does, and cancelling it works.
        assert f"/ui/mcp/tasks/{done.task_id}/cancel" not in page.text
        answer = client.post(f"/ui/mcp/tasks/{queued.task_id}/cancel", data={"csrf": csrf_of(page.text)})
        assert answer.status_code == 303 and "cancelled" in answer.headers["location"]
    assert pg_store.load_task(queued.task_id).status == "cancelled"
    assert pg_store.load_task(done.task_id).status == "completed"


def test_dead_letters_page_says_plainly_why_not_with_rabbitmq_or_embedded(pg_store: Store) -> None:
    cases = {
        "amqp://guest:guest@127.0.0.1:5672/": "RabbitMQ broker keeps dead letters in its own queues",
        None: "dead letters live in Redis",
    }
    for broker_url, says in cases.items():
        app = create_app(settings(api_token=None, redis_url=None, broker_url=broker_url), store=pg_store)
        with TestClient(app, client=("127.0.0.1", 40000), follow_redirects=False) as local:
            page = local.get("/ui/dead-letters")
            assert page.status_code == 200 and says in page.text
            assert "guest:guest" not in page.text
            assert local.get("/ui/dead-letters/purge").status_code == 409


def test_requeue_all_matching_moves_only_the_filtered_and_purge_asks_first(
    server: ServerThread, redis_client: Any
) -> None:
    appends = [dead_letter(redis_client) for _ in range(2)]
    other = dead_letter(redis_client, actor="save_session", arg={"session_id": "x"})
    with httpx.Client(base_url=server.url) as client:
        sign_in(client)
        page = client.get("/ui/dead-letters?actor=append_messages")
        assert "Requeue all 2 matching" in page.text
        done = client.post("/ui/dead-letters/requeue",
                           data={"csrf": csrf_of(page.text), "actor": "append_messages", "reason": "", "all": "1"})
        assert "requeued+2+job" in done.headers["location"]
        assert sorted(redis_client.lrange("dramatiq:sessions", 0, -1)) == sorted(rid.encode() for rid in appends)
        assert redis_client.zscore("dramatiq:sessions.XQ", other) is not None
        # Purge: the confirmation page says how many, and only its POST deletes.
        confirm = client.get("/ui/dead-letters/purge")
        assert "all <strong>1</strong> dead letter(s)" in confirm.text
        assert redis_client.zcard("dramatiq:sessions.XQ") == 1
        purged = client.post("/ui/dead-letters/purge", data={"csrf": csrf_of(confirm.text)})
        assert "purged+1+dead" in purged.headers["location"]
    assert redis_client.zcard("dramatiq:sessions.XQ") == 0
    assert redis_client.llen("dramatiq:sessions") == 2  # the requeued jobs stay queued


def test_many_dead_letters_are_counted_in_batches_and_the_newest_shown(
    server: ServerThread, redis_client: Any
) -> None:
    pipe = redis_client.pipeline(transaction=False)
    for i in range(1200):
        rid = f"dl-{i:05d}"
        data = {"queue_name": "bulk", "actor_name": "export_session", "args": [{"i": i}], "kwargs": {},
                "options": {"dead_letter_reason": f"InvalidPayload: number {i}"}, "message_id": f"m{i}",
                "message_timestamp": 1_700_000_000_000}
        pipe.zadd("dramatiq:bulk.XQ", {rid: 1_700_000_000_000 + i})
        pipe.hset("dramatiq:bulk.XQ.msgs", rid, json.dumps(data))
    pipe.execute()
    with httpx.Client(base_url=server.url) as client:
        sign_in(client)
        page = client.get("/ui/dead-letters")
        assert "1200 dead letter(s); the newest 500 are shown" in page.text
        assert "dl-01199" in page.text and "dl-00699" not in page.text
        narrowed = client.get("/ui/dead-letters", params={"reason": "number 1199"})
        assert "1 dead letter(s) match" in narrowed.text
