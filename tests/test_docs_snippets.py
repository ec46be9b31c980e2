"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs in a fresh interpreter, in a temporary working directory, with only the
installed package importable (the repository is not on ``sys.path``, so a stale
``from models import ...`` fails as it would for a user) and with the environment the
documentation tells a user to set: ``REDIS_URL`` and ``STORAGE_URL`` pointing at the
test services. Whatever a block enqueues is then run by a real worker, which must not
dead-letter any of it. A failure names the Markdown file and the line of the block, and
the traceback's line numbers are the Markdown file's own.

A block that is only an excerpt says so on the line before its fence
(``<!-- fragment -->``); it is still compiled, and only a few blocks may be marked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.conftest import POSTGRES_URL, REDIS_URL, make_store, reset_store
from tests.support_jobs import (
    QUEUES,
    WorkerProcess,
    dead_letters,
    pending_jobs,
    wait_drained,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The marker, alone on the line before a fence, of a block that is not meant to run.
FRAGMENT_MARK = "<!-- fragment -->"
# Fragments allowed across all the docs: an excerpt is the exception, not the habit.
MAX_FRAGMENTS = 1
# Info strings (first word) of the blocks that are Python.
PYTHON_INFO = frozenset({"python", "py", "python3"})
# Seconds one block may run before it is reported as hanging.
DEFAULT_SNIPPET_TIMEOUT = 120.0
# Environment variables a developer's shell may carry that would change what a block does.
_FOREIGN_ENV = re.compile(r"^(SESSIONQ_|STORAGE_|SESSION_|MCP_|REDIS_URL$|PYTHONPATH$|MAX_EVENTS_PER_SESSION$)")
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
# Runs a block from stdin compiled under its Markdown file's name, padded so that line
# numbers in a traceback are the file's own.
_RUNNER = (
    "import sys\n"
    "path, line = sys.argv[1], int(sys.argv[2])\n"
    "code = compile('\\n' * line + sys.stdin.read(), path, 'exec')\n"
    "exec(code, {'__name__': '__main__'})\n"
)


@dataclass(frozen=True)
class Snippet:
    """One fenced Python block: where it is, its code, whether it is marked a fragment."""

    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    fragment: bool

    @property
    def where(self) -> str:
        """``FILE:LINE`` of the opening fence, relative to the repository when inside it."""
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def python_blocks(path: Path) -> list[Snippet]:
    """The fenced Python blocks of one Markdown file (CommonMark fences, ``` or ~~~)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Snippet] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        start, body = i, []
        i += 1
        while i < len(lines):
            closing = _FENCE.match(lines[i])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence) \
                    and not closing["info"].strip():
                break
            body.append(lines[i].removeprefix(opening["indent"]))
            i += 1
        else:
            raise ValueError(f"{path}:{start + 1}: code fence never closed")
        i += 1
        if info.split(maxsplit=1)[:1] and info.split(maxsplit=1)[0].lower() in PYTHON_INFO:
            marked = start > 0 and lines[start - 1].strip() == FRAGMENT_MARK
            blocks.append(Snippet(path, start + 1, "\n".join(body) + "\n", marked))
    return blocks


def all_snippets() -> list[Snippet]:
    """Every Python block of README.md and docs/*.md."""
    return [snippet for path in DOCS for snippet in python_blocks(path)]


def snippet_env(**extra: str) -> dict[str, str]:
    """The environment a block runs in: this shell's, minus sessionq settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
    env.update(extra)
    return env


def run_snippet(snippet: Snippet, cwd: Path, env: dict[str, str],
                timeout: float = DEFAULT_SNIPPET_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``snippet`` in a fresh interpreter; fail naming its file and line unless it exits 0."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", _RUNNER, str(snippet.path), str(snippet.line)],
            input=snippet.code, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{snippet.where}: the python block did not finish within {timeout:.0f} s")
    if result.returncode != 0:
        pytest.fail(f"{snippet.where}: the python block exits {result.returncode}:\n{result.stderr[-4000:]}",
                    pytrace=False)
    return result


SNIPPETS = all_snippets()


@pytest.fixture
def clean_postgres(tmp_path: Path) -> Iterator[str]:
    """The test PostgreSQL store, migrated and emptied before and after: its URL."""
    store = make_store("postgresql", tmp_path)
    reset_store(store)
    yield POSTGRES_URL
    reset_store(store)
    store.close()


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if not s.fragment], ids=lambda s: s.where)
def test_python_block_runs_as_written(snippet: Snippet, tmp_path: Path, redis_client: redis.Redis,
                                      clean_postgres: str) -> None:
    # Given a fresh directory and the environment the docs tell a user to set
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = snippet_env(REDIS_URL=REDIS_URL, STORAGE_URL=clean_postgres)
    # When the block runs as a script
    run_snippet(snippet, cwd, env)
    # Then it exits 0, and a real worker accepts every job it enqueued
    if pending_jobs(redis_client):
        worker = WorkerProcess(clean_postgres, threads=2, log=tmp_path / "worker.log",
                               SESSIONQ_EXPORT_DIR=str(tmp_path / "exports"))
        try:
            wait_drained(redis_client, worker)
        finally:
            worker.stop()
        dead = {queue: [m["actor_name"] for m in dead_letters(redis_client, queue)] for queue in QUEUES}
        assert not any(dead.values()), f"{snippet.where}: jobs dead-lettered {dead}\n{worker.output()[-3000:]}"


def test_docs_have_python_blocks_and_few_fragments() -> None:
    # The extractor finds the blocks the docs are known to hold (README, producer, MCP)
    files = {s.path.name for s in SNIPPETS}
    assert {"README.md", "producer.md", "mcp.md"} <= files, files
    fragments = [s for s in SNIPPETS if s.fragment]
    assert len(fragments) <= MAX_FRAGMENTS, f"too many blocks marked {FRAGMENT_MARK}: {[s.where for s in fragments]}"
    # A fragment does not run, but it still parses
    for snippet in fragments:
        try:
            compile("\n" * snippet.line + snippet.code, str(snippet.path), "exec")
        except SyntaxError as exc:
            pytest.fail(f"{snippet.where}: fragment does not parse: {exc}", pytrace=False)
    # And no fragment marker sits anywhere but right before a Python fence
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, text in enumerate(lines[:-1], 1):
            if text.strip() == FRAGMENT_MARK:
                following = _FENCE.match(lines[number])
                info = following["info"].strip().split(maxsplit=1)[:1] if following else []
                assert info and info[0].lower() in PYTHON_INFO, f"{path.name}:{number}: stray {FRAGMENT_MARK}"


def test_extractor_reads_fences_lines_and_marks(tmp_path: Path) -> None:
    # Given Markdown with a plain block, a marked fragment, a tilde fence, a nested fence and a JS block
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# t\n\n```python\nx = 1\n```\n\n" + FRAGMENT_MARK + "\n```py\ny = x\n```\n"
        "~~~python\n```\nz = 3\n~~~\n````markdown\n```python\nw = 4\n```\n````\n```js\nlet a = 1\n```\n"
    )
    # When its blocks are extracted
    blocks = python_blocks(doc)
    # Then each Python block has its fence line, its code and its mark; the others are skipped
    assert [(b.line, b.code, b.fragment) for b in blocks] == [
        (3, "x = 1\n", False), (8, "y = x\n", True), (11, "```\nz = 3\n", False),
    ]
    doc.write_text("```python\nnever closed\n")
    with pytest.raises(ValueError, match=r"doc\.md:1: code fence never closed"):
        python_blocks(doc)


def test_a_failing_block_is_reported_by_file_and_line(tmp_path: Path) -> None:
    # Given a block whose third line raises
    doc = tmp_path / "guide.md"
    doc.write_text("intro\n\n```python\nvalue = 1\nprint(value)\nproducer.heartbeat(mcp_session_id)\n```\n")
    (snippet,) = python_blocks(doc)
    # When it runs
    with pytest.raises(pytest.fail.Exception) as failure:
        run_snippet(snippet, tmp_path, snippet_env())
    # Then the failure names the block and the traceback names the Markdown line that raised
    message = str(failure.value)
    assert message.startswith(f"{doc}:3: the python block exits 1")
    assert f'File "{doc}", line 6' in message and "NameError" in message
