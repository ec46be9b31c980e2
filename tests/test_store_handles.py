"""The state-handle and idempotency parts of the Store contract, run against every backend."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from sessionq.models import Conflict, NotFound, Settings, Store, ValidationError
from sessionq.models.handles import StateHandle, new_handle_id
from sessionq.models.idempotency import IdempotencyEntry, entry_id_for
from sessionq.models.kinds import HANDLES, IDEMPOTENCY_ENTRIES
from sessionq.scheduler.sweeps import run_sweep
from tests.conftest import T0

DATA = {"items": ["ü", {"$sku": "a.b"}], "n": 2}


def make_handle(**fields: object) -> StateHandle:
    """A basket of alice made at T0: one day absolute, one hour idle."""
    values: dict[str, object] = {"handle_id": new_handle_id("bsk"), "kind": "basket", "owner": "alice",
                                 "data": DATA, "created_at": T0, "expires_at": T0 + timedelta(days=1),
                                 "idle_ttl": 3600}
    values.update(fields)
    return StateHandle(**values)  # type: ignore[arg-type]


def make_entry(key: str = "k1", owner: str | None = "alice", **fields: object) -> IdempotencyEntry:
    """A pending claim of ``key`` made at T0, held for a minute."""
    values: dict[str, object] = {"entry_id": entry_id_for(owner, key), "key": key, "owner": owner, "tool": "pay",
                                 "args_digest": "d1", "created_at": T0, "expires_at": T0 + timedelta(minutes=1)}
    values.update(fields)
    return IdempotencyEntry(**values)  # type: ignore[arg-type]


def test_a_handle_reads_back_for_its_owner_only(store: Store) -> None:
    handle = store.create_handle(make_handle())
    assert handle.handle_id.startswith("bsk_") and len(handle.handle_id) == 4 + 22
    assert store.load_handle(handle.handle_id) == handle
    assert handle.idle_until == T0 + timedelta(hours=1)
    ok = store.get_handle(handle.handle_id, "alice", T0)
    assert ok.status == "ok" and ok.handle == handle
    # A foreign or anonymous caller and a made-up id get one answer: unknown
    for owner, handle_id in (("bob", handle.handle_id), (None, handle.handle_id), ("alice", "bsk_nope")):
        lookup = store.get_handle(handle_id, owner, T0)
        assert lookup.status == "unknown" and lookup.handle is None
    with pytest.raises(Conflict):
        store.create_handle(make_handle(handle_id=handle.handle_id, owner="bob"))


def test_idle_and_absolute_lifetimes_and_touch(store: Store) -> None:
    handle = store.create_handle(make_handle())
    # Idle for an hour: expired
    assert store.get_handle(handle.handle_id, "alice", T0 + timedelta(hours=1)).status == "expired"
    # A use at 59 min pushes the idle deadline out; a use right after writes nothing
    used = store.touch_handle(handle, T0 + timedelta(minutes=59))
    assert used.idle_until == T0 + timedelta(minutes=119) and used.version == 1
    assert store.touch_handle(used, T0 + timedelta(minutes=60)) is used
    assert store.load_handle(handle.handle_id) == used
    assert store.get_handle(handle.handle_id, "alice", T0 + timedelta(hours=1)).status == "ok"
    # The absolute deadline holds however often it is used
    late = T0 + timedelta(days=1)
    assert store.get_handle(handle.handle_id, "alice", late).status == "expired"
    assert store.list_handles("alice", None, T0 + timedelta(minutes=30)).items == [used]
    assert store.list_handles("alice", None, late).items == []


def test_update_is_compare_and_set_on_the_version(store: Store) -> None:
    handle = store.create_handle(make_handle())
    now = T0 + timedelta(minutes=5)
    updated = store.update_handle(handle.handle_id, "alice", {"items": ["x"]}, 0, now)
    assert updated.version == 1 and updated.data == {"items": ["x"]} and updated.updated_at == now
    assert store.load_handle(handle.handle_id) == updated
    with pytest.raises(Conflict):
        store.update_handle(handle.handle_id, "alice", {"items": ["lost"]}, 0, now)
    with pytest.raises(NotFound):
        store.update_handle(handle.handle_id, "bob", {"items": []}, 1, now)
    with pytest.raises(ValidationError):
        store.update_handle(handle.handle_id, "alice", {"bad": object()}, 1, now)
    # Two writers racing from one version: exactly one wins
    outcomes: list[str] = []

    def write(n: int) -> None:
        try:
            store.update_handle(handle.handle_id, "alice", {"n": n}, 1, now)
            outcomes.append("won")
        except Conflict:
            outcomes.append("lost")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost", "lost", "lost", "won"]
    assert store.load_handle(handle.handle_id).version == 2


def test_revoke_and_sweep(store: Store) -> None:
    kept, revoked, idle = (store.create_handle(make_handle()) for _ in range(3))
    assert not store.revoke_handle(revoked.handle_id, "bob", T0)
    assert store.revoke_handle(revoked.handle_id, "alice", T0)
    assert not store.revoke_handle(revoked.handle_id, "alice", T0)
    assert store.get_handle(revoked.handle_id, "alice", T0).status == "revoked"
    store.touch_handle(kept, T0 + timedelta(minutes=59))
    # Two hours on, with an hour of retention: the revoked one goes; the idle one
    # (dead since T0+1h) is still answered as expired until T0+2h has passed
    settings = Settings(handle_retention=3600)
    at = T0 + timedelta(hours=2) - timedelta(seconds=1)
    assert run_sweep("handles", store, settings, now=at, dry_run=True) == {"handles": 1, "idempotency_entries": 0}
    assert run_sweep("handles", store, settings, now=at) == {"handles": 1, "idempotency_entries": 0}
    assert store.get_handle(revoked.handle_id, "alice", at).status == "unknown"
    assert store.get_handle(idle.handle_id, "alice", at).status == "expired"
    later = T0 + timedelta(hours=3)
    assert run_sweep("handles", store, settings, now=later) == {"handles": 2, "idempotency_entries": 0}
    assert store.stats().handles == 0


def test_list_pages_by_owner_and_kind(store: Store) -> None:
    mine = sorted(store.create_handle(make_handle()).handle_id for _ in range(5))
    store.create_handle(make_handle(kind="cart", handle_id=new_handle_id("crt")))
    store.create_handle(make_handle(owner="bob"))
    gone = store.create_handle(make_handle())
    store.revoke_handle(gone.handle_id, "alice", T0)
    seen: list[str] = []
    cursor = None
    while True:
        page = store.list_handles("alice", "basket", T0, limit=2, cursor=cursor)
        assert len(page.items) <= 2
        seen += [h.handle_id for h in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == mine
    assert len(store.list_handles("alice", None, T0).items) == 6
    assert [h.owner for h in store.list_handles("bob", None, T0).items] == ["bob"]


def test_handles_and_entries_are_bulk_kinds(store: Store) -> None:
    handle = store.create_handle(make_handle())
    entry, _ = store.claim_idempotency(make_entry(), T0)
    assert store.list_kind(HANDLES).items == [handle]
    assert store.find_kind(IDEMPOTENCY_ENTRIES, [(entry.entry_id,)]) == [entry]
    newer = handle.replace(data={"n": 9}, version=3)
    assert store.import_kind(HANDLES, [newer, handle]) >= 1
    assert store.load_handle(handle.handle_id) == newer


def test_an_idempotency_key_is_claimed_once(store: Store) -> None:
    results: list[bool] = []

    def claim() -> None:
        results.append(store.claim_idempotency(make_entry(), T0)[1])

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    claim_ = store.load_idempotency(entry_id_for("alice", "k1"))
    # Another owner's same key is its own entry
    assert store.claim_idempotency(make_entry(owner="bob"), T0)[1]
    done = store.finish_idempotency(claim_, T0 + timedelta(hours=1), result={"content": [], "isError": False})
    assert done is not None and done.done and store.load_idempotency(claim_.entry_id) == done
    stored, claimed = store.claim_idempotency(make_entry(), T0 + timedelta(minutes=30))
    assert not claimed and stored == done
    # Finishing a claim that was taken over changes nothing
    assert store.finish_idempotency(claim_, T0, task_id="t1") is None


def test_an_expired_claim_is_taken_over_and_a_release_frees_the_key(store: Store) -> None:
    first, _ = store.claim_idempotency(make_entry(), T0)
    later = T0 + timedelta(minutes=2)
    second, claimed = store.claim_idempotency(make_entry(created_at=later, expires_at=later + timedelta(minutes=1)),
                                              later)
    assert claimed and second.version == 1
    assert store.finish_idempotency(first, later, task_id="t1") is None
    assert not store.release_idempotency(first)
    assert store.release_idempotency(second)
    assert store.claim_idempotency(make_entry(), later)[1]
    with pytest.raises(ValidationError):
        store.finish_idempotency(second, later)
    counts = run_sweep("handles", store, Settings(), now=T0 + timedelta(hours=1))
    assert counts == {"handles": 0, "idempotency_entries": 1}
