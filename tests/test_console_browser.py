"""The ops console in a real browser: Debian's Chromium driven by Playwright, against
``sessionq serve`` (a subprocess) on the real PostgreSQL and Redis with a real worker
process. One walk-through, as an operator would: sign in, watch a queue fill and
drain, requeue a dead letter, find a session by metadata and download its Markdown,
open a deep link, sign out. Screenshots of every page go to ``$SESSIONQ_ARTIFACTS``
(default: the test's tmp dir), never into the repository.

Playwright never downloads a browser here: it starts ``/usr/bin/chromium`` (installed by
``.ci/run``) with the flags this sandbox needs (no network beyond loopback).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sessionq.models import ChatSession, Store
from tests.conftest import IN_CI, POSTGRES_URL, REDIS_URL
from tests.support_http import cli_command, free_port, subprocess_env
from tests.support_jobs import WorkerProcess, push_raw
from tests.support_services import wait_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token-9876543210"
# Milliseconds a page may take to show what the test waits for (the worker boots meanwhile).
WAIT_MS = 45_000
SAVES = 40


def artifacts_dir(tmp_path: Path) -> Path:
    """Where screenshots and downloads go: ``$SESSIONQ_ARTIFACTS/console`` or the tmp dir."""
    root = os.environ.get("SESSIONQ_ARTIFACTS")
    out = Path(root) / "console" if root else tmp_path / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def serve(pg_store: Store, redis_client: Any, tmp_path: Path) -> Iterator[str]:
    """``sessionq serve`` with the test token on a free loopback port; its base URL."""
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    env = subprocess_env(STORAGE_URL=POSTGRES_URL, REDIS_URL=REDIS_URL, SESSIONQ_API_TOKEN=TOKEN)
    proc = subprocess.Popen(cli_command("serve", "--port", str(port)), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, timeout=60, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def save_job(i: int) -> tuple[str, dict[str, Any]]:
    """A save job for session ``s{i:03d}`` with metadata ``team=t{i}``."""
    at = datetime(2026, 1, 1, 12, i % 60, tzinfo=UTC).isoformat()
    return ("save_session", {
        "session_id": f"s{i:03d}", "model": "gpt-test", "created_at": at, "updated_at": at,
        "metadata": {"team": f"t{i}"},
        "messages": [{"message_id": "m1", "role": "user", "content": f"hello from session {i}", "created_at": at}],
    })


@pytest.mark.slow
def test_operator_walk_through(browser: Any, serve: str, pg_store: Store, redis_client: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    shots = artifacts_dir(tmp_path)
    started = time.monotonic()
    # Jobs waiting before any worker runs: forty saves, and an append to a session that
    # does not exist yet (dead-lettered at once: the worker gets no retries).
    now = datetime.now(UTC).isoformat()
    late_append = ("append_messages", {"session_id": "late", "messages": [
        {"message_id": "m1", "role": "user", "content": "arrived before its session", "created_at": now}]})
    push_raw(redis_client, [save_job(i) for i in range(SAVES)] + [late_append])

    context = browser.new_context(base_url=serve, accept_downloads=True)
    page = context.new_page()
    worker: WorkerProcess | None = None
    try:
        # Not signed in: every page sends us to the sign-in form.
        page.goto("/ui/dead-letters")
        expect(page).to_have_url(f"{serve}/ui/signin?next=%2Fui%2Fdead-letters")
        page.screenshot(path=shots / "01-signin.png")
        page.get_by_label("API token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(f"{serve}/ui/dead-letters")
        page.get_by_role("link", name="Overview").click()

        # The queue is full...
        sessions_ready = page.locator('#queues tr[data-queue="sessions"] td.ready')
        expect(sessions_ready).to_have_text(str(SAVES + 1))
        page.screenshot(path=shots / "02-overview-filled.png")
        # ...and drains while we watch: the page updates itself (no reload).
        worker = WorkerProcess(POSTGRES_URL, log=tmp_path / "worker.log", SESSIONQ_JOB_MAX_RETRIES="0")
        expect(sessions_ready).to_have_text("0", timeout=WAIT_MS)
        dead_cell = page.locator('#queues tr[data-queue="sessions"] td').nth(4)
        expect(dead_cell).to_have_text("1", timeout=WAIT_MS)
        expect(page.locator("#workers")).to_have_text("1", timeout=WAIT_MS)
        expect(page.locator("#jobs-per-second")).not_to_have_text("0.00", timeout=WAIT_MS)
        page.screenshot(path=shots / "03-overview-drained.png")

        # The dead letter: its session exists now, so a requeue from the page succeeds.
        pg_store.save_session(ChatSession(session_id="late", model="gpt-test", created_at=datetime.now(UTC),
                                          updated_at=datetime.now(UTC)))
        page.get_by_role("link", name="Dead letters").click()
        row = page.locator("#dead-letters tbody tr", has_text="append_messages")
        expect(row).to_contain_text("SessionNotReady")
        page.screenshot(path=shots / "04-dead-letters.png")
        row.get_by_role("link", name="inspect").click()
        expect(page.locator("#payload")).to_contain_text("arrived before its session")
        page.screenshot(path=shots / "05-dead-letter.png")
        page.go_back()
        page.locator("#dead-letters tbody tr", has_text="append_messages").get_by_role("button", name="requeue").click()
        expect(page.locator(".flash")).to_have_text("requeued 1 job(s)")
        deadline = time.monotonic() + WAIT_MS / 1000
        while pg_store.load_session("late").message_count != 1:
            assert time.monotonic() < deadline, worker.output()[-2000:]
            time.sleep(0.1)
        expect(page.locator("#dead-letters tbody")).to_contain_text("No dead letters")

        # Find a session by metadata, read it, download its Markdown.
        page.get_by_role("link", name="Sessions").click()
        page.get_by_label("Metadata key=value").fill("team=t7")
        page.get_by_role("button", name="Search").click()
        expect(page).to_have_url(f"{serve}/ui/sessions?id=&model=&status=&meta=team%3Dt7&after=&before=")
        results = page.locator("#sessions tbody tr")
        expect(results).to_have_count(1)
        page.screenshot(path=shots / "06-sessions.png")
        results.get_by_role("link", name="s007").click()
        expect(page.locator("article.msg")).to_contain_text("hello from session 7")
        page.screenshot(path=shots / "07-session.png")
        with page.expect_download() as download_info:
            page.locator("#download-md").click()
        markdown = shots / "s007.md"
        download_info.value.save_as(markdown)
        text = markdown.read_text(encoding="utf-8")
        assert text.startswith("# Session s007") and "hello from session 7" in text
        # Archive it: the archive_session job, run by the worker.
        page.get_by_role("button", name="Archive").click()
        expect(page.locator(".flash")).to_have_text("archive job sent for s007")
        deadline = time.monotonic() + WAIT_MS / 1000
        while pg_store.load_session("s007").status != "archived":
            assert time.monotonic() < deadline, worker.output()[-2000:]
            time.sleep(0.1)
        page.reload()
        expect(page.locator("#session-status")).to_have_text("archived")

        # A deep link with filters: the form shows them, back/forward keep them.
        page.goto("/ui/sessions?status=active&model=gpt-test&meta=team%3Dt12&after=2026-01-01T11%3A00%3A00%2B00%3A00")
        expect(page.get_by_label("Updated after (UTC)")).to_have_value(re.compile(r"^2026-01-01T11:00(:00)?$"))
        expect(page.get_by_label("Model")).to_have_value("gpt-test")
        expect(page.get_by_label("Status")).to_have_value("active")
        expect(page.get_by_label("Metadata key=value")).to_have_value("team=t12")
        expect(page.locator("#sessions tbody tr")).to_have_count(1)
        page.get_by_role("link", name="s012").click()
        page.go_back()
        expect(page.get_by_label("Metadata key=value")).to_have_value("team=t12")
        page.get_by_role("button", name="Search").click()  # resubmitting keeps every filter
        expect(page.locator("#sessions tbody tr")).to_have_count(1)
        expect(page.get_by_label("Updated after (UTC)")).to_have_value(re.compile(r"^2026-01-01T11:00(:00)?$"))
        page.screenshot(path=shots / "07b-deep-link.png")
        page.goto("/ui/sessions")
        expect(page.locator("#sessions tbody tr")).to_have_count(SAVES + 1)  # one page of 50 holds them all
        page.goto("/ui/sessions?status=archived")
        expect(page.locator("#sessions tbody tr")).to_have_count(1)
        page.goto("/ui/mcp")
        page.screenshot(path=shots / "08-mcp.png")

        # Sign out: the console is closed again.
        page.get_by_role("button", name="Sign out").click()
        expect(page).to_have_url(f"{serve}/ui/signin")
        page.goto("/ui/sessions")
        expect(page).to_have_url(f"{serve}/ui/signin?next=%2Fui%2Fsessions")
    except Exception:
        page.screenshot(path=shots / "failure.png")
        raise
    finally:
        context.close()
        if worker is not None:
            worker.stop()
    # The browser part stays well inside a minute (CI budget); reported, never asserted.
    print(f"console walk-through: {time.monotonic() - started:.1f}s; screenshots in {shots}")
    if os.environ.get("SESSIONQ_ARTIFACTS") is None:
        shutil.rmtree(shots, ignore_errors=True)
