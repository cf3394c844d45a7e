"""The durable event log: what is acknowledged is on disk, failed batches leave nothing, training reads it."""

from __future__ import annotations

import errno
import fcntl
import os
import random
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from features import eventlog
from features.dataset import load_dataset
from features.eventlog import (
    EventLog,
    EventLogError,
    consent_row,
    epoch_seconds,
    erase_row,
    erased_users,
    read_control,
    replay,
)
from features.online import MemoryStore
from features.store import CONSENT_PURPOSES, OnlineEvent
from features.weights import DEFAULT_EVENT_WEIGHTS

T0 = 1_764_064_800.0  # 2025-11-25T10:00:00Z
EVENT_TYPES = list(DEFAULT_EVENT_WEIGHTS)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def row(n: int, user: str = "u1", kind: str = "view", ts: float = T0) -> dict[str, object]:
    return {"event_id": f"e{n}", "user_id": user, "item_id": f"p{n:07d}", "event_type": kind,
            "timestamp": iso(ts + n)}


def log_files(directory: Path, family: str = "events") -> list[Path]:
    return sorted((directory / family).glob("*.jsonl"))


def test_appended_rows_load_as_a_training_set(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EventLog(data, clock=lambda: T0) as event_log:
        event_log.append([row(n) for n in range(5)])
        event_log.append([row(n, user="007", kind="purchase") | {"price": 9.5, "quantity": 2}
                          for n in range(5, 8)])
        event_log.append([])
    [path] = log_files(data)
    assert path.name == f"events-{eventlog._safe_host()}-{os.getpid()}-2025112510.jsonl"
    dataset = load_dataset(data, EVENT_TYPES)
    assert dataset.rejects.empty
    assert len(dataset.events) == 8
    assert dataset.events["event_id"].tolist() == [f"e{n}" for n in range(8)]
    assert set(dataset.events.loc[dataset.events["event_type"] == "purchase", "user_id"]) == {"007"}


def test_one_file_per_process_and_hour(tmp_path: Path) -> None:
    now = [T0]
    with EventLog(tmp_path, clock=lambda: now[0]) as event_log:
        event_log.append([row(0)])
        now[0] = T0 + 3_600
        event_log.append([row(1)])
        event_log.append([row(2)])
    assert [p.name.rsplit("-", 1)[1] for p in log_files(tmp_path)] == ["2025112510.jsonl", "2025112511.jsonl"]
    assert [len(p.read_bytes().splitlines()) for p in log_files(tmp_path)] == [1, 2]


def test_append_returns_only_after_fsync_of_the_written_bytes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    event_log = EventLog(tmp_path)
    calls: list[tuple[str, int]] = []
    real_write, real_fsync = os.write, os.fsync

    def write(fd: int, data: bytes | memoryview) -> int:
        calls.append(("write", len(data)))
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    event_log.append([row(0), row(1)])
    monkeypatch.undo()
    [path] = log_files(tmp_path)
    size = path.stat().st_size
    assert calls[-1] == ("fsync", size)  # the last thing before returning: the whole batch made durable
    assert [c for c in calls if c[0] == "write"] == [("write", size)]  # one write: group commit
    event_log.close()


@pytest.mark.parametrize("fails", ["write", "fsync"])
def test_a_failed_batch_leaves_the_file_exactly_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          fails: str) -> None:
    event_log = EventLog(tmp_path)
    event_log.append([row(0), row(1), consent_row("u1", {"marketing": False}, T0)])
    before = {p: p.read_bytes() for p in log_files(tmp_path) + log_files(tmp_path, "control")}
    real_write = os.write

    def half_write(fd: int, data: bytes | memoryview) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write" if fails == "write" else "fsync", half_write if fails == "write" else no_space)
    with pytest.raises(EventLogError, match="No space left"):
        event_log.append([row(2), row(3), erase_row("u2", T0)])
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in before} == before
    event_log.append([row(4)])  # the log goes on after the disk has room again
    assert len(load_dataset(tmp_path, EVENT_TYPES).events) == 3
    event_log.close()


def test_a_row_that_is_not_json_writes_nothing(tmp_path: Path) -> None:
    with EventLog(tmp_path) as event_log:
        event_log.append([row(0)])
        with pytest.raises(EventLogError, match="JSON"):
            event_log.append([row(1), row(2) | {"price": object()}])
    [path] = log_files(tmp_path)
    assert len(path.read_bytes().splitlines()) == 1


def test_a_torn_last_line_is_cut_on_start_unless_a_live_writer_holds_the_file(tmp_path: Path) -> None:
    (tmp_path / "events").mkdir()
    good = b"".join(orjson.dumps(row(n)) + b"\n" for n in range(3))
    torn = tmp_path / "events" / "events-oldhost-1-2025112509.jsonl"
    torn.write_bytes(good + b'{"event_id": "e3", "user_id": "u1", "ite')
    held = tmp_path / "events" / "events-otherhost-2-2025112509.jsonl"
    held.write_bytes(b'{"event_id": "e9", "user_id": "u9", "item')  # being written right now
    writer = os.open(held, os.O_RDWR)
    fcntl.flock(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        EventLog(tmp_path).close()
        assert torn.read_bytes() == good
        assert held.read_bytes().endswith(b'"item')
    finally:
        os.close(writer)
    held.unlink()
    dataset = load_dataset(tmp_path, EVENT_TYPES)
    assert dataset.rejects.empty
    assert len(dataset.events) == 3


def test_a_file_without_any_newline_is_emptied(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir()
    torn = tmp_path / "control" / "control-oldhost-1-2025112509.jsonl"
    torn.write_bytes(b'{"event_type": "era')
    assert eventlog.repair(tmp_path) == len(b'{"event_type": "era')
    assert torn.read_bytes() == b""


def test_control_rows_are_read_apart_and_training_ignores_them(tmp_path: Path) -> None:
    with EventLog(tmp_path) as event_log:
        event_log.append([row(0), consent_row("u1", {"personalization": False}, T0 + 5), row(1),
                          erase_row("u2", T0 + 2)])
        with pytest.raises(ValueError, match="user_id"):
            event_log.append([{"event_type": "erase", "timestamp": iso(T0)}])
    control = read_control(tmp_path)
    assert [(r["event_type"], r["user_id"]) for r in control] == [("erase", "u2"), ("consent", "u1")]
    assert control[1]["purposes"] == {"personalization": False}
    assert erased_users(tmp_path) == {"u2"}
    dataset = load_dataset(tmp_path, EVENT_TYPES)
    assert dataset.rejects.empty
    assert dataset.events["event_id"].tolist() == ["e0", "e1"]


def test_epoch_seconds_reads_what_the_contract_allows() -> None:
    assert epoch_seconds("2025-11-25T10:00:00Z") == T0
    assert epoch_seconds("2025-11-25T11:00:00+01:00") == T0
    assert epoch_seconds(T0) == T0
    assert epoch_seconds(str(int(T0))) == T0
    assert epoch_seconds("2025-11-25T10:00:00") is None  # no zone: not guessed
    assert epoch_seconds("yesterday") is None
    assert epoch_seconds(None) is None
    assert epoch_seconds(True) is None


def _state(store: MemoryStore, users: list[str]) -> dict[str, object]:
    return {
        "recent": {u: store.recent(u) for u in users},
        "purchased": {u: store.purchased(u) for u in users},
        "consent": {u: store.consent(u) for u in users},
        "erased": store.erased(users),
        "ties": {u: (store.snapshot(u).shared_to, store.snapshot(u).referred_by) for u in users},
        "trending": store.trending(48, 100),
        "trending_by_category": {c: store.trending(48, 100, category=c) for c in ("c0", "c1", "c2")},
    }


def test_replay_rebuilds_the_store_that_direct_recording_built(tmp_path: Path) -> None:
    rng = random.Random(7)
    users = [f"u{n}" for n in range(12)]
    kinds = ["view", "view", "add_to_cart", "purchase", "share", "like", "impression", "refund"]
    category = {f"p{n:07d}": f"c{n % 3}" for n in range(30)}
    rows = [
        {"event_id": f"e{n}", "user_id": rng.choice(users), "item_id": rng.choice(sorted(category)),
         "event_type": rng.choice(kinds), "timestamp": iso(T0 + n * 97.3)}
        for n in range(400)
    ]
    for n, r in enumerate(rows):  # some shares reach someone, some events come through a referral
        if r["event_type"] == "share" and n % 2:
            r["target_user_id"] = rng.choice(users)
        if n % 5 == 0:
            r["referrer_id"] = rng.choice(users)
    direct = MemoryStore()
    with EventLog(tmp_path, clock=lambda: T0) as event_log:
        for start in range(0, len(rows), 50):
            batch = rows[start : start + 50]
            event_log.append(batch)
            direct.record([OnlineEvent(str(r["user_id"]), str(r["item_id"]), str(r["event_type"]),
                                       T0 + int(str(r["event_id"])[1:]) * 97.3, category[str(r["item_id"])],
                                       r.get("target_user_id"), r.get("referrer_id"))
                           for r in batch])
        event_log.append([consent_row("u3", {"marketing": False, "social_proof": False}, T0 + 50_000)])
        direct.set_consent("u3", {"marketing": False, "social_proof": False})
        event_log.append([erase_row("u4", T0 + 50_001)])
        direct.erase_user("u4")

    rebuilt = MemoryStore()
    stats = replay(tmp_path, rebuilt, category_of=category.get)
    assert (stats.events, stats.control, stats.skipped) == (400, 2, 0)
    assert _state(rebuilt, users) == _state(direct, users)
    assert rebuilt.recent("u4") == []
    assert rebuilt.consent("u3") == {p: p == "personalization" for p in CONSENT_PURPOSES}
    assert rebuilt.claim_event_ids(["e0", "e399", "new"]) == [False, False, True]  # retries stay no-ops


def test_replay_since_skips_older_events_and_repeated_ids(tmp_path: Path) -> None:
    with EventLog(tmp_path) as event_log:
        event_log.append([row(0, ts=T0), row(1, ts=T0), row(1, ts=T0), {"user_id": "u1", "event_type": "view"}])
    store = MemoryStore()
    stats = replay(tmp_path, store, since=T0 + 1)
    assert (stats.events, stats.control, stats.skipped) == (1, 0, 2)
    assert [e.item_id for e in store.recent("u1")] == ["p0000001"]
