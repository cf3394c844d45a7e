"""Compaction takes erased users' events out of the event log's closed files, leaves every other row byte for
byte and a file being written alone, survives a crash mid-way, and runs on its own in the service."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from features import compaction
from features.compaction import compact_log
from features.dataset import load_dataset
from features.eventlog import CONTROL, EVENTS, EventLog, erase_row
from features.weights import DEFAULT_EVENT_WEIGHTS
from serving.app import create_app
from serving.settings import ServingSettings
from sharefeed.cli import main
from training.bundle import Bundle, load_bundle
from training.pipeline import TrainResult

H1 = datetime(2026, 1, 5, 10, tzinfo=UTC).timestamp()  # an hour long past
H2 = H1 + 3600


def _event(user: str, item: str, kind: str = "view", **extra: str) -> dict[str, object]:
    return {"event_id": f"{user}-{item}-{kind}", "user_id": user, "item_id": item, "event_type": kind,
            "timestamp": "2026-01-05T10:30:00Z", **extra}


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _users(path: Path) -> list[str]:
    return [orjson.loads(line)["user_id"] for line in _lines(path)]


def _erase(directory: Path, user: str, ts: float | None = None) -> None:
    with EventLog(directory) as log:
        log.append([erase_row(user, time.time() if ts is None else ts)])


def test_erased_rows_leave_closed_files_and_every_other_row_stays_byte_for_byte(tmp_path: Path) -> None:
    with EventLog(tmp_path, clock=lambda: H1) as closed_log:
        closed_log.append([_event("u1", "a"), _event("u2", "a"), _event("u1", "b", "purchase"),
                           _event("u2", "c", "share", target_user_id="u1"),
                           _event("u3", "c", "purchase", referrer_id="u1"), _event("u3", "d")])
        closed = closed_log.paths()[0]
    original = _lines(closed)
    writing = EventLog(tmp_path, clock=lambda: H2)  # another process, still writing its file
    writing.append([_event("u1", "e"), _event("u2", "e")])
    busy = writing.paths()[0]
    busy_before = busy.read_bytes()
    _erase(tmp_path, "u1")

    report = compact_log(tmp_path, now=time.time())
    assert (report.files_rewritten, report.rows_removed, report.rows_redacted, report.files_busy) == (1, 2, 2, 1)
    after = _lines(closed)
    assert "u1" not in _users(closed)
    assert after[0] == original[1]  # u2's view, byte for byte
    assert after[-1] == original[-1]  # u3's view
    redacted = [orjson.loads(line) for line in after[1:3]]
    assert redacted == [{k: v for k, v in orjson.loads(original[i]).items() if v != "u1"} for i in (3, 4)]
    assert busy.read_bytes() == busy_before  # a file a writer holds is not touched
    assert list((tmp_path / CONTROL).iterdir())  # the tombstone stays

    writing.close()
    later = compact_log(tmp_path, now=time.time())
    assert (later.files_rewritten, later.rows_removed, later.files_busy) == (1, 1, 0)
    assert _users(busy) == ["u2"]
    assert compact_log(tmp_path, now=time.time()).files_checked == 0  # nothing new: nothing read again
    data = load_dataset(tmp_path, DEFAULT_EVENT_WEIGHTS)
    assert sorted(data.events["user_id"]) == ["u2", "u2", "u2", "u3", "u3"]


def test_training_set_and_compaction_agree_on_others_rows_naming_an_erased_user(tmp_path: Path) -> None:
    with EventLog(tmp_path, clock=lambda: H1) as log:
        log.append([_event("u2", "c", "share", target_user_id="u1"), _event("u3", "c", "purchase", referrer_id="u1"),
                    _event("u1", "c", "purchase")])
    _erase(tmp_path, "u1")
    before = load_dataset(tmp_path, DEFAULT_EVENT_WEIGHTS).events  # training drops and redacts already
    compact_log(tmp_path, now=time.time())
    after = load_dataset(tmp_path, DEFAULT_EVENT_WEIGHTS).events
    for frame in (before, after):
        assert sorted(frame["user_id"]) == ["u2", "u3"]
        assert "u1" not in set(frame["target_user_id"].dropna()) | set(frame["referrer_id"].dropna())


def test_a_crash_mid_compaction_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with EventLog(tmp_path, clock=lambda: H1) as log:
        log.append([_event("u1", "a"), _event("u2", "a")])
        path = log.paths()[0]
    before = path.read_bytes()
    _erase(tmp_path, "u1")

    def crash(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(compaction.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        compact_log(tmp_path, now=time.time())
    assert path.read_bytes() == before
    assert list((tmp_path / EVENTS).glob(".*.compact.tmp"))  # the new file never got the name
    monkeypatch.undo()
    assert compact_log(tmp_path, now=time.time()).rows_removed == 1
    assert _users(path) == ["u2"]
    assert not list((tmp_path / EVENTS).glob(".*.compact.tmp"))


def test_a_writer_that_opened_a_file_compaction_then_replaced_writes_to_the_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = EventLog(tmp_path, clock=lambda: H1)
    log.append([_event("u1", "a"), _event("u2", "a")])
    path = log.paths()[0]
    log.close()
    replaced = orjson.dumps(_event("u2", "a")) + b"\n"
    real_flock = fcntl.flock
    swapped: list[bool] = []

    def flock_after_a_swap(fd: int, operation: int) -> None:
        if not swapped:  # between the writer's open and its lock, compaction renames a new file over the name
            swapped.append(True)
            tmp = path.with_name(".swap")
            tmp.write_bytes(replaced)
            os.replace(tmp, path)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_swap)
    log.append([_event("u3", "b")])
    monkeypatch.undo()
    log.close()
    assert swapped
    assert _users(path) == ["u2", "u3"]  # the row went to the file under the name, not the unlinked one


def test_a_writer_lets_go_of_past_hours_files(tmp_path: Path) -> None:
    now = [H1]
    log = EventLog(tmp_path, clock=lambda: now[0])
    log.append([_event("u1", "a")])
    _erase(tmp_path, "u1")
    assert compact_log(tmp_path, now=time.time()).files_busy == 1
    assert log.release_idle() == 0  # still its hour
    now[0] = H2
    assert log.release_idle() == 1
    assert log.paths() == []
    assert compact_log(tmp_path, now=time.time()).rows_removed == 1
    log.close()


def test_compact_command_reports_and_fails_when_a_busy_file_is_past_retention(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHAREFEED_EVENT_LOG", str(tmp_path))
    old_hour = time.time() - 3 * 86_400
    stuck = EventLog(tmp_path, clock=lambda: old_hour)  # a writer that never let go of a three-day-old file
    stuck.append([_event("u1", "a"), _event("u2", "a")])
    _erase(tmp_path, "u1", ts=time.time() - 2 * 86_400)
    failed = CliRunner().invoke(main, ["compact", "--retention-days", "1"])
    assert failed.exit_code == 1
    assert "1 files in use still hold erased users' events past the retention period" in failed.output
    assert "u1" not in failed.output
    assert CliRunner().invoke(main, ["compact", "--retention-days", "5"]).exit_code == 0
    stuck.close()
    done = CliRunner().invoke(main, ["compact"])
    assert done.exit_code == 0, done.output
    assert "1 events of erased users removed" in done.output


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


def test_the_service_compacts_on_its_own(bundle: Bundle, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    user = bundle.users.ids[7]
    with EventLog(tmp_path / "log", clock=lambda: H1) as log:
        log.append([_event(user, "a"), _event("someone-else", "a")])
        path = log.paths()[0]
    settings = ServingSettings(event_log=tmp_path / "log", compaction_interval_seconds=0.1)
    caplog.set_level(logging.INFO, logger="serving.compactor")
    with TestClient(create_app(settings, bundle=bundle)) as client:
        assert client.delete(f"/v1/users/{user}").status_code == 202
        deadline = time.monotonic() + 10
        while user in _users(path) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _users(path) == ["someone-else"]
    messages = [r.getMessage() for r in caplog.records if r.name == "serving.compactor"]
    assert any("1 events of erased users removed" in m for m in messages)
    assert not any(user in m for m in messages)  # counts only
