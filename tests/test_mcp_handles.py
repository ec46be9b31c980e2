"""State handles and idempotent tools at protocol 2026-07-28: the real SDK client
against two replicas of ``tests.handle_app`` and a ``tasks`` worker, on PostgreSQL
and Redis."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from mcp.server.auth.provider import AccessToken, principal_components
from mcp.server.request_state import compact_json
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, RequestParamsMeta, TextContent

from sessionq.models import Settings, Store, utcnow
from sessionq.models.idempotency import entry_id_for
from sessionq.scheduler.sweeps import run_sweep
from sessionq.workers.mcp.idempotency import IDEMPOTENCY_KEY_META
from sessionq.workers.mcp.tasks_client import CreateTaskResult, wait_for_task
from tests.support_mcp import anyio_backend  # noqa: F401  (fixture)
from tests.support_tasks import Cluster, task_client

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Replicas A and B of the handle app and one tasks worker, for the whole module."""
    from tests.conftest import make_store

    tmp = tmp_path_factory.mktemp("handles")
    make_store("postgresql", tmp).close()  # the schema, before the processes start
    nodes = Cluster(tmp)
    try:
        a, b = nodes.replica(module="tests.handle_app"), nodes.replica(module="tests.handle_app")
        nodes.worker(app="tests.handle_app:server")
        yield a, b
    finally:
        nodes.stop()


def text(result: CallToolResult) -> str:
    """The text of a result's first content block."""
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


async def new_basket(client: Any) -> str:
    """The ``basket_id`` of a new basket made through ``client``."""
    content = (await client.call_tool("create_basket", {})).structured_content
    assert content is not None
    return str(content["basket_id"])


def refusal(result: CallToolResult) -> str:
    """The message of a tool error (after the SDK's ``Error executing tool X:``)."""
    assert result.is_error
    prefix, _, message = text(result).partition(": ")
    assert prefix.startswith("Error executing tool")
    return message


def owner_key(user: str) -> str:
    """The owner key tasks and handles store for a bearer token of ``tests.task_app``:
    the sha256 of the SDK's principal (client, issuer, subject)."""
    token = AccessToken(token=user, client_id="tests", subject=user, scopes=[])
    return hashlib.sha256(compact_json(principal_components(token)).encode()).hexdigest()


def keyed(key: str) -> RequestParamsMeta:
    """The ``_meta`` of a call with idempotency key ``key``."""
    return cast(RequestParamsMeta, {IDEMPOTENCY_KEY_META: key})


def executions(marker: Path) -> int:
    """How often a tool counting in ``marker`` ran."""
    return len(marker.read_text().splitlines()) if marker.exists() else 0


async def test_a_basket_lives_across_replicas_for_its_owner_only(cluster: tuple[str, str], pg_store: Store) -> None:
    a, b = cluster
    async with task_client(a) as alice_a, task_client(b) as alice_b, task_client(b, "bob") as bob_b:
        # Given a basket alice created on A
        basket_id = await new_basket(alice_a)
        assert basket_id.startswith("bsk_") and len(basket_id) == 26
        # When she adds items on B, then on A
        assert (await alice_b.call_tool("add_item", {"basket_id": basket_id, "sku": "tea"})).structured_content == {
            "result": 1}
        assert (await alice_a.call_tool("add_item", {"basket_id": basket_id, "sku": "jam"})).structured_content == {
            "result": 2}
        # Then the store holds both, bound to her principal's digest, never the token
        stored = pg_store.load_handle(basket_id)
        assert stored.data == {"items": ["tea", "jam"]} and stored.owner == owner_key("alice")
        # And bob cannot tell it from a basket that does not exist
        foreign = await bob_b.call_tool("add_item", {"basket_id": basket_id, "sku": "x"})
        missing = await bob_b.call_tool("add_item", {"basket_id": "bsk_nothere", "sku": "x"})
        assert refusal(foreign) == f"basket {basket_id} is unknown; call create_basket"
        assert refusal(missing) == "basket bsk_nothere is unknown; call create_basket"
        assert pg_store.load_handle(basket_id).data == {"items": ["tea", "jam"]}


async def test_concurrent_adds_on_both_replicas_all_land(cluster: tuple[str, str], pg_store: Store) -> None:
    a, b = cluster
    async with task_client(a) as on_a, task_client(b) as on_b:
        basket_id = await new_basket(on_a)
        async with anyio.create_task_group() as tg:
            for n in range(6):
                client = on_a if n % 2 else on_b
                tg.start_soon(client.call_tool, "add_item", {"basket_id": basket_id, "sku": f"s{n}"})
        assert sorted(pg_store.load_handle(basket_id).data["items"]) == [f"s{n}" for n in range(6)]


async def test_an_expired_ticket_says_what_to_call_and_the_sweep_removes_it(
    cluster: tuple[str, str], pg_store: Store
) -> None:
    a, b = cluster
    async with task_client(a) as on_a, task_client(b) as on_b:
        ticket = text(await on_a.call_tool("create_ticket", {}))
        assert text(await on_b.call_tool("use_ticket", {"ticket_id": ticket})) == ticket
        # When it stays idle past its one second
        await anyio.sleep(1.2)
        expired = await on_b.call_tool("use_ticket", {"ticket_id": ticket})
        assert refusal(expired) == f"ticket {ticket} has expired; call create_ticket"
        # Then the sweep (no retention) deletes it, and it becomes unknown
        counts = run_sweep("handles", pg_store, Settings(handle_retention=0))
        assert counts["handles"] >= 1
        assert pg_store.get_handle(ticket, owner_key("alice"), utcnow()).status == "unknown"
        gone = await on_a.call_tool("use_ticket", {"ticket_id": ticket})
        assert refusal(gone) == f"ticket {ticket} is unknown; call create_ticket"


async def test_a_revoked_basket_is_refused_on_every_replica(cluster: tuple[str, str]) -> None:
    a, b = cluster
    async with task_client(a) as on_a, task_client(b) as on_b, task_client(a, "bob") as bob:
        basket_id = await new_basket(on_a)
        assert (await bob.call_tool("drop_basket", {"basket_id": basket_id})).structured_content == {"result": False}
        assert (await on_b.call_tool("drop_basket", {"basket_id": basket_id})).structured_content == {"result": True}
        refused = await on_a.call_tool("add_item", {"basket_id": basket_id, "sku": "tea"})
        assert refusal(refused) == f"basket {basket_id} was revoked; call create_basket"


async def test_baskets_list_in_pages_across_replicas(cluster: tuple[str, str]) -> None:
    a, b = cluster
    async with task_client(a, "bob") as on_a, task_client(b, "bob") as on_b:
        made = {await new_basket(on_a)
                for _ in range(3)}
        dropped = await new_basket(on_a)
        await on_b.call_tool("drop_basket", {"basket_id": dropped})
        seen: list[str] = []
        cursor = None
        for page_number, client in enumerate((on_b, on_a, on_b)):  # noqa: B007 (checked after the loop)
            page = (await client.call_tool("list_baskets", {"cursor": cursor})).structured_content
            assert page is not None and len(page["baskets"]) <= 2
            seen += page["baskets"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert page_number == 1 and set(seen) >= made and dropped not in seen
        assert seen == sorted(seen)


async def test_one_key_on_both_replicas_at_once_runs_once(
    cluster: tuple[str, str], pg_store: Store, tmp_path: Path
) -> None:
    a, b = cluster
    marker = tmp_path / "charge"
    args = {"amount": 7, "marker": str(marker)}
    results: list[CallToolResult] = []
    async with task_client(a) as on_a, task_client(b) as on_b:
        async def call(client: Any) -> None:
            results.append(await client.session.call_tool("charge", args, meta=keyed("order-1")))

        # When the same key reaches A and B at the same time (twice each)
        async with anyio.create_task_group() as tg:
            for client in (on_a, on_b, on_a, on_b):
                tg.start_soon(call, client)
        # Then the tool ran once and every caller got its one result
        assert executions(marker) == 1
        assert {r.model_dump_json() for r in results} == {results[0].model_dump_json()}
        assert results[0].structured_content == {"result": 1007}
        # And a later retry replays it; the same key with other arguments is -32602
        again = await on_b.session.call_tool("charge", args, meta=keyed("order-1"))
        assert again.structured_content == {"result": 1007} and executions(marker) == 1
        with pytest.raises(MCPError) as other:
            await on_a.session.call_tool("charge", {**args, "amount": 8}, meta=keyed("order-1"))
        assert other.value.error.code == -32602
        # Another principal's same key, and a call without a key, are calls of their own
        async with task_client(b, "bob") as bob:
            assert (await bob.session.call_tool("charge", args, meta=keyed("order-1"))).structured_content == {
                "result": 2007}
        assert (await on_a.call_tool("charge", args)).structured_content == {"result": 3007}
    assert pg_store.load_idempotency(entry_id_for(owner_key("alice"), "order-1")).done


async def test_one_key_for_a_task_tool_makes_one_task(
    cluster: tuple[str, str], pg_store: Store, tmp_path: Path
) -> None:
    a, b = cluster
    marker = tmp_path / "render"
    handles: list[Any] = []
    async with task_client(a) as on_a, task_client(b) as on_b:
        async def call(client: Any) -> None:
            handles.append(await client.session.call_tool("render", {"marker": str(marker)}, allow_claimed=True,
                                                          meta=keyed("render-1")))

        async with anyio.create_task_group() as tg:
            for client in (on_a, on_b, on_b):
                tg.start_soon(call, client)
        # Then every caller holds the same task handle, and there is one task
        assert all(isinstance(h, CreateTaskResult) for h in handles)
        assert {h.task_id for h in handles} == {handles[0].task_id}
        tasks = [t for t in pg_store.list_tasks().items if t.tool == "render"]
        assert [t.task_id for t in tasks] == [handles[0].task_id]
        done = await wait_for_task(on_b.session, handles[0].task_id)
        assert done.status == "completed" and executions(marker) == 1
        # A retry after completion gets the same task again
        retry = await on_a.session.call_tool("render", {"marker": str(marker)}, allow_claimed=True,
                                             meta=keyed("render-1"))
        assert isinstance(retry, CreateTaskResult) and retry.task_id == handles[0].task_id


async def test_a_repeat_safe_tool_runs_once_per_arguments_and_entries_are_swept(
    cluster: tuple[str, str], pg_store: Store, tmp_path: Path
) -> None:
    a, b = cluster
    marker = tmp_path / "lookup"
    async with task_client(a) as on_a, task_client(b) as on_b:
        first = await on_a.call_tool("lookup", {"term": "x", "marker": str(marker)})
        second = await on_b.call_tool("lookup", {"marker": str(marker), "term": "x"})
        other = await on_b.call_tool("lookup", {"term": "y", "marker": str(marker)})
    assert text(first) == text(second) == "x:1" and text(other) == "y:2" and executions(marker) == 2
    # Once their TTL (a day) has passed, the sweep deletes the entries
    later = utcnow() + timedelta(days=2)
    assert run_sweep("handles", pg_store, Settings(), now=later)["idempotency_entries"] >= 2
    assert pg_store.stats().idempotency_entries == 0
