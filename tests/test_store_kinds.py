"""The Store contract for bulk listing and import of file records, transport sessions
and agent state, run against every backend (see conftest ``store``), and the
per-kind "newer" rules of sessionq.models.kinds."""

from __future__ import annotations

import threading
from datetime import timedelta
from itertools import pairwise
from typing import Any

import pytest

from sessionq.models import AgentState, FileRecord, Store, StoreUnavailable, TransportSession, ValidationError
from sessionq.models.kinds import (
    AGENT_STATES,
    DEFAULT_IMPORT_CHUNK,
    DEFAULT_IMPORT_ROUNDS,
    FILES,
    KINDS,
    TRANSPORTS,
    RecordKind,
    kind_named,
)
from tests.conftest import T0, reset_store
from tests.support_bulk import fill_kinds


def _file(i: int, **changes: Any) -> FileRecord:
    return FileRecord(f"f{i:03d}", "gemini", f"files/{i}", size=i, uploaded_at=T0, metadata={"i": i}).replace(**changes)


def _transport(i: int, **changes: Any) -> TransportSession:
    return TransportSession(f"t{i:03d}", created_at=T0, working_directory=f"/w/{i}").replace(**changes)


def _agent(agent: str, key: str, **changes: Any) -> AgentState:
    return AgentState(agent, key, {"v": key}, updated_at=T0).replace(**changes)


def test_listings_are_keyset_pages_in_key_order_including_expired_records(store: Store) -> None:
    # Given 11 records of each kind written through the ordinary paths, some already past expiry
    fill_kinds(store, 11)
    store.put_agent_state(AgentState("a0", "k", 1, updated_at=T0, expires_at=T0 - timedelta(days=1)))
    cases: list[tuple[RecordKind[Any], int]] = [(FILES, 11), (TRANSPORTS, 11), (AGENT_STATES, 12)]
    for kind, expected in cases:
        # When the kind is listed 4 at a time
        pages: list[list[Any]] = []
        cursor: str | None = None
        while True:
            page = store.list_kind(kind, limit=4, cursor=cursor)
            pages.append(page.items)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        # Then the pages hold every record once, in key order, and iterating gives the same
        keys = [kind.key(r) for items in pages for r in items]
        assert [len(items) for items in pages] == ([4, 4, 4] if expected == 12 else [4, 4, 3])
        assert keys == sorted(keys) and len(set(keys)) == expected, kind.name
        assert list(store.iter_kind(kind, page_size=5)) == [r for items in pages for r in items]
    # And the typed iterators list the same records as the single-record reads
    assert [f.file_id for f in store.iter_files(page_size=3)] == [f"f{i:04d}" for i in range(11)]
    assert store.load_transport("t0002") in list(store.iter_transports())
    expired = next(a for a in store.iter_agent_states() if (a.agent_id, a.key) == ("a0", "k"))
    assert store.get_agent_state("a0", "k", T0) is None and expired.value == 1


def test_composite_keys_page_across_agents_sharing_key_names(store: Store) -> None:
    # Given agents whose key names interleave
    states = [_agent(a, k) for a in ("b", "a", "c") for k in ("z", "m", "a")]
    assert store.import_kind(AGENT_STATES, states) == 9
    # When listed one entry per page
    seen, cursor = [], None
    while True:
        page = store.list_kind(AGENT_STATES, limit=1, cursor=cursor)
        seen += [(s.agent_id, s.key) for s in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    # Then the order is by agent, then key
    assert seen == [(a, k) for a in ("a", "b", "c") for k in ("a", "m", "z")]
    with pytest.raises(ValidationError, match="cursor"):
        store.list_kind(AGENT_STATES, cursor="not json")


def test_import_keeps_every_field_and_a_reimport_is_a_no_op(store: Store) -> None:
    # Given records of every kind read from a filled store, which is then emptied
    fill_kinds(store, 9)
    before = {kind.plural: list(store.iter_kind(kind)) for kind in KINDS}
    reset_store(store)
    for kind in KINDS:
        records = before[kind.plural]
        # When imported twice
        first, second = store.import_kind(kind, records), store.import_kind(kind, records)
        # Then they are stored exactly as given, once
        assert (first, second) == (9, 0), kind.name
        assert list(store.iter_kind(kind)) == records
    statuses = {t.status for t in before["transports"]}
    assert statuses == {"active", "disconnected", "recovered", "expired"}
    assert store.load_file("f0003") == before["files"][3]
    assert store.get_agent_state("a2", "k0002", T0) == before["agent_states"][[
        (a.agent_id, a.key) for a in before["agent_states"]].index(("a2", "k0002"))]


def test_an_older_copy_never_overwrites_a_newer_one(store: Store) -> None:
    # Given a newer copy of a record of each kind
    store.import_kind(FILES, [_file(1, uploaded_at=T0 + timedelta(hours=1), display_name="new")])
    store.import_kind(AGENT_STATES, [_agent("a", "k", value="new", updated_at=T0 + timedelta(hours=1))])
    store.import_kind(TRANSPORTS, [_transport(1, status="disconnected", disconnected_at=T0 + timedelta(minutes=5),
                                              grace_expires_at=T0 + timedelta(minutes=15))])
    # When older copies are imported
    older = (
        store.import_kind(FILES, [_file(1, display_name="old")]),
        store.import_kind(AGENT_STATES, [_agent("a", "k", value="old")]),
        store.import_kind(TRANSPORTS, [_transport(1, last_heartbeat=T0 + timedelta(minutes=4))]),
    )
    # Then nothing changes
    assert older == (0, 0, 0)
    assert store.load_file("f001").display_name == "new"
    assert store.list_kind(AGENT_STATES).items[0].value == "new"
    assert store.load_transport("t001").status == "disconnected"
    # And newer copies, or same-version copies that differ, replace them
    assert store.import_kind(FILES, [_file(1, uploaded_at=T0 + timedelta(hours=2), display_name="newest")]) == 1
    assert store.import_kind(AGENT_STATES, [_agent("a", "k", value="tie", updated_at=T0 + timedelta(hours=1))]) == 1
    revived = _transport(1, last_heartbeat=T0 + timedelta(minutes=6))
    assert store.import_kind(TRANSPORTS, [revived]) == 1
    assert store.load_file("f001").display_name == "newest"
    assert store.list_kind(AGENT_STATES).items[0].value == "tie"
    assert store.load_transport("t001") == revived


def test_the_newest_of_duplicate_keys_in_one_import_wins(store: Store) -> None:
    copies = [_file(7, uploaded_at=T0 + timedelta(seconds=s), uri=f"files/{s}") for s in (2, 9, 1)]
    assert store.import_kind(FILES, copies) == 1
    assert store.load_file("f007").uri == "files/9"


def test_find_kind_returns_the_stored_records_among_the_keys(store: Store) -> None:
    store.import_kind(FILES, [_file(i) for i in range(3)])
    store.import_kind(AGENT_STATES, [_agent("a", "x"), _agent("b", "y")])
    assert sorted(f.file_id for f in store.find_kind(FILES, [("f000",), ("f002",), ("ghost",)])) == ["f000", "f002"]
    # A composite key matches as a pair: ("a", "y") is not stored although both parts are
    found = store.find_kind(AGENT_STATES, [("a", "x"), ("a", "y"), ("b", "y")])
    assert sorted((s.agent_id, s.key) for s in found) == [("a", "x"), ("b", "y")]
    with pytest.raises(ValidationError, match="key"):
        store.find_kind(AGENT_STATES, [("a",)])


def test_imports_larger_than_one_chunk_are_complete(store: Store) -> None:
    states = [_agent(f"a{i % 7}", f"k{i:04d}", value=i) for i in range(1201)]
    assert store.import_kind(AGENT_STATES, states) == 1201
    assert store.import_kind(AGENT_STATES, states) == 0
    assert store.stats().agent_states == 1201
    assert sum(1 for _ in store.iter_agent_states(page_size=500)) == 1201


def test_concurrent_imports_of_old_and_new_copies_end_with_the_newest(store: Store) -> None:
    # Given two importers racing over the same 200 keys, one with older copies, one with newer
    old = [_agent(f"a{i % 3}", f"k{i:03d}", value="old") for i in range(200)]
    new = [s.replace(value="new", updated_at=T0 + timedelta(seconds=1)) for s in old]
    errors: list[BaseException] = []

    def run(batch: list[AgentState]) -> None:
        try:
            for _ in range(3):
                store.import_kind(AGENT_STATES, batch)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(batch,)) for batch in (old, new, old)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then every key holds the newer copy, once
    assert errors == []
    stored = list(store.iter_agent_states())
    assert len(stored) == 200 and {s.value for s in stored} == {"new"}


# -- the version rules (pure logic) ------------------------------------------------------


def test_transport_versions_follow_the_state_machine() -> None:
    live = _transport(1, last_heartbeat=T0 + timedelta(minutes=1))
    # A disconnect at the very instant of the last heartbeat is newer than the live copy
    gone = live.replace(status="disconnected", disconnected_at=live.last_heartbeat,
                        grace_expires_at=T0 + timedelta(minutes=11))
    expired = gone.replace(status="expired")
    revived = live.replace(last_heartbeat=T0 + timedelta(minutes=2))
    # A recovery counts even when its clock is behind the disconnect
    recovered = live.replace(status="recovered", recovery_attempts=1, last_heartbeat=T0)
    chain = [live, gone, expired]
    for older, newer in pairwise(chain):
        assert TRANSPORTS.replaces(newer, older) and not TRANSPORTS.replaces(older, newer)
    assert TRANSPORTS.replaces(revived, gone) and not TRANSPORTS.replaces(gone, revived)
    assert TRANSPORTS.replaces(recovered, expired) and not TRANSPORTS.replaces(expired, recovered)
    assert not TRANSPORTS.replaces(live, live)


def test_kinds_are_named_and_cursors_round_trip() -> None:
    assert kind_named("files") is FILES and kind_named("agent_state") is AGENT_STATES
    with pytest.raises(ValidationError, match="unknown record kind"):
        kind_named("events")
    kind: RecordKind[Any] = AGENT_STATES
    state = _agent('a"quoted",[', "k\\x")
    assert kind.parse_cursor(kind.cursor(state)) == ('a"quoted",[', "k\\x")
    assert FILES.parse_cursor(FILES.cursor(_file(3))) == ("f003",)


def test_import_rounds_take_key_ordered_chunks_and_give_up_when_writers_keep_racing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a spy on the backend's import round
    rounds: list[list[Any]] = []
    real = store._import_round

    def spy(kind: RecordKind[Any], records: Any) -> tuple[int, bool]:
        rounds.append([kind.key(r) for r in records])
        return real(kind, records)

    monkeypatch.setattr(store, "_import_round", spy)
    # When more than one chunk of keys is imported out of order
    states = [_agent(f"a{i % 3}", f"k{i:04d}") for i in reversed(range(DEFAULT_IMPORT_CHUNK + 5))]
    assert store.import_kind(AGENT_STATES, states) == DEFAULT_IMPORT_CHUNK + 5
    # Then each round gets one chunk, all of them in key order
    assert [len(keys) for keys in rounds] == [DEFAULT_IMPORT_CHUNK, 5]
    assert [key for keys in rounds for key in keys] == sorted(AGENT_STATES.key(s) for s in states)
    # And when every round finds another writer in the way, the import gives up after the last round
    raced: list[int] = []

    def never_complete(kind: RecordKind[Any], records: Any) -> tuple[int, bool]:
        raced.append(len(records))
        return 0, False

    monkeypatch.setattr(store, "_import_round", never_complete)
    with pytest.raises(StoreUnavailable, match="kept racing"):
        store.import_kind(FILES, [_file(1)])
    assert raced == [1] * DEFAULT_IMPORT_ROUNDS
