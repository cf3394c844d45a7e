"""Event id claims across a crash: a worker that claimed a batch's ids and died before logging it must not make
the client's retry a "duplicate" of events no log holds. Claims are pending until the log holds the batch;
a retry waits (503) while a claim is young and takes it over once it is older than the takeover time.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from features.eventlog import EVENTS, EventLog
from features.keys import Keys
from features.online import MemoryStore, RedisStore
from features.store import ClaimOutcome, OnlineEvent
from serving.app import create_app
from serving.ingest import EventsInFlightError, ingest
from serving.recovery import Recovery
from serving.settings import ServingSettings
from training.bundle import Bundle, load_bundle
from training.pipeline import TrainResult

pytest_plugins = ["redis_fixture"]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


@contextlib.contextmanager
def _service(bundle: Bundle, redis_url: str, prefix: str, log: Path,
             takeover_seconds: float = 10.0) -> Iterator[TestClient]:
    settings = ServingSettings(redis_url=redis_url, redis_prefix=prefix, event_log=log, recovery_poll_seconds=0.05,
                               reload_poll_seconds=0.1, overlay_refresh_seconds=0.0,
                               claim_takeover_seconds=takeover_seconds)
    store = RedisStore(redis_url, prefix)
    with TestClient(create_app(settings, bundle=bundle, store=store)) as client:
        yield client
    store.close()


def _batch(n: int) -> list[dict[str, object]]:
    stamp = datetime.fromtimestamp(time.time() - 1, UTC).isoformat()
    return [{"event_id": uuid.uuid4().hex, "user_id": f"u{k}", "item_id": "p1", "event_type": "view",
             "timestamp": stamp} for k in range(n)]


def _ids(batch: list[dict[str, object]]) -> list[str]:
    return [str(e["event_id"]) for e in batch]


def _logged_ids(log: Path) -> Counter[str]:
    ids: Counter[str] = Counter()
    for path in sorted((log / EVENTS).glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            ids[str(orjson.loads(line)["event_id"])] += 1
    return ids


def _pending_since(redis_url: str, prefix: str, event_ids: list[str], seconds_ago: float, owner: str) -> None:
    """Claims as a worker writes them before its log append (then, here, it died)."""
    store = RedisStore(redis_url, prefix)
    server_ms = int(store.client.time()[0]) * 1000
    for event_id in event_ids:
        store.client.set(Keys(prefix).event_id(event_id), f"p:{server_ms - int(seconds_ago * 1000)}:{owner}")
    store.close()


# -- through the API, on a real Redis -----------------------------------------------------------------------------
def test_a_retry_logs_the_events_of_a_worker_that_died_after_claiming_them(
        bundle: Bundle, redis_url: str, tmp_path: Path) -> None:
    prefix = f"sfc:{uuid.uuid4().hex[:8]}:"
    log = tmp_path / "log"
    batch = _batch(5)
    _pending_since(redis_url, prefix, _ids(batch), 60.0, "deadhost:4242:0badc0de:7")
    with _service(bundle, redis_url, prefix, log) as client:
        answer = client.post("/v1/events", json={"events": batch})
        assert answer.status_code == 200, answer.text
        assert (answer.json()["accepted"], answer.json()["duplicates"]) == (5, 0)
        again = client.post("/v1/events", json={"events": batch}).json()
        assert (again["accepted"], again["duplicates"]) == (0, 5)
    assert [_logged_ids(log)[i] for i in _ids(batch)] == [1] * 5


def test_a_retry_while_the_claim_is_young_waits_and_claims_nothing(
        bundle: Bundle, redis_url: str, tmp_path: Path) -> None:
    prefix = f"sfc:{uuid.uuid4().hex[:8]}:"
    log = tmp_path / "log"
    batch = _batch(3)
    _pending_since(redis_url, prefix, _ids(batch)[:1], 0.0, "otherhost:1:cafe:0")
    with _service(bundle, redis_url, prefix, log) as client:
        answer = client.post("/v1/events", json={"events": batch})
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "1"
        assert "retry" in answer.json()["detail"]
        assert not _logged_ids(log)
        store = RedisStore(redis_url, prefix)
        store.finish_claims(_ids(batch)[:1])  # the other request logged its event
        store.close()
        retried = client.post("/v1/events", json={"events": batch}).json()
        assert (retried["accepted"], retried["duplicates"]) == (2, 1)  # the other two were not left claimed
    assert set(_logged_ids(log)) == set(_ids(batch)[1:])


_DIES_BEFORE_THE_APPEND = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path

    import orjson

    from features.eventlog import EventLog
    from features.online import RedisStore
    from serving.ingest import ingest
    from serving.recovery import Recovery

    class DiesBeforeTheAppend(EventLog):
        def append(self, rows):
            os.kill(os.getpid(), signal.SIGKILL)

    url, prefix, log_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    recovery = Recovery(RedisStore(url, prefix), log_dir, window_seconds=86_400.0, backlog_limit=100,
                        poll_seconds=1.0)
    recovery.check()
    ingest(orjson.loads(sys.stdin.buffer.read()), event_types=["view"], online=recovery,
           event_log=DiesBeforeTheAppend(log_dir), category_of=lambda _: None)
""")


def test_a_worker_killed_between_claim_and_append_loses_no_event(
        bundle: Bundle, redis_url: str, tmp_path: Path) -> None:
    prefix = f"sfc:{uuid.uuid4().hex[:8]}:"
    log = tmp_path / "log"
    batch = _batch(4)
    worker = subprocess.run([sys.executable, "-c", _DIES_BEFORE_THE_APPEND, redis_url, prefix, str(log)],
                            input=orjson.dumps(batch), cwd=ROOT, capture_output=True, timeout=60, check=False)
    assert worker.returncode == -9, worker.stderr.decode()[-2000:]
    assert not _logged_ids(log)
    killed_at = time.monotonic()
    answers: list[int] = []
    with _service(bundle, redis_url, prefix, log, takeover_seconds=5.0) as client:
        while True:  # the client retries what was not acknowledged, as Retry-After asks
            answer = client.post("/v1/events", json={"events": batch})
            answers.append(answer.status_code)
            if answer.status_code != 503:
                break
            assert time.monotonic() - killed_at < 30, "the dead worker's claims were never taken over"
            time.sleep(0.25)
        assert answer.status_code == 200, answer.text
        assert (answer.json()["accepted"], answer.json()["duplicates"]) == (4, 0)
        again = client.post("/v1/events", json={"events": batch}).json()
        assert (again["accepted"], again["duplicates"]) == (0, 4)
    if time.monotonic() - killed_at < 4.5:
        pytest.fail(f"taken over before the takeover time: {answers}")
    assert answers[0] == 503  # the first retry came while the claims were young
    assert [_logged_ids(log)[i] for i in _ids(batch)] == [1] * 4


# -- the in-process fallback (the store away) follows the same states ---------------------------------------------
def _offline_recovery(tmp_path: Path, takeover_seconds: float) -> Recovery:
    recovery = Recovery(MemoryStore(), tmp_path / "log", window_seconds=86_400.0, backlog_limit=100,
                        poll_seconds=1.0, takeover_seconds=takeover_seconds)
    assert not recovery.ready  # never checked: claims go to this process's memory only
    return recovery


def test_fallback_claims_pending_done_duplicate_and_busy(tmp_path: Path) -> None:
    recovery = _offline_recovery(tmp_path, takeover_seconds=60.0)
    first = recovery.claim(["a", "b"])
    assert (first.fresh, first.in_store, first.busy) == ([True, True], False, 0)
    busy = recovery.claim(["b", "c"])  # "b" is being logged by the first request
    assert (busy.fresh, busy.busy) == ([False, False], 1)
    assert recovery.claim(["c"]).fresh == [True]  # "c" was not left claimed by the refused batch
    recovery.record([OnlineEvent("u", "p", "view", 0.0)] * 2, ["a", "b"], first)
    done = recovery.claim(["a", "b"])
    assert (done.fresh, done.busy) == ([False, False], 0)


def test_fallback_takeover_and_a_late_release_keeps_the_new_claim(tmp_path: Path) -> None:
    recovery = _offline_recovery(tmp_path, takeover_seconds=0.05)
    stalled = recovery.claim(["a"])
    time.sleep(0.1)
    taken = recovery.claim(["a"])
    assert taken.fresh == [True]
    recovery.release(["a"], stalled)  # the stalled request's append failed at last
    assert recovery.claim(["a"]).busy == 1  # the claim is still the second request's
    recovery.release(["a"], taken)
    assert recovery.claim(["a"]).fresh == [True]


def test_ingest_refuses_a_batch_with_ids_in_flight(tmp_path: Path) -> None:
    recovery = _offline_recovery(tmp_path, takeover_seconds=60.0)
    batch = _batch(2)
    recovery.claim(_ids(batch)[:1])
    with EventLog(tmp_path / "log") as log, pytest.raises(EventsInFlightError):
        ingest(batch, event_types=["view"], online=recovery, event_log=log, category_of=lambda _: None)
    assert not _logged_ids(tmp_path / "log")


def test_the_store_claim_outcomes_reach_the_worker(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    store = RedisStore(redis_url, redis_prefix)
    recovery = Recovery(store, tmp_path / "log", window_seconds=86_400.0, backlog_limit=100, poll_seconds=1.0)
    recovery.check()
    assert recovery.ready
    assert store.claim_pending(["x"], "elsewhere:0") == [ClaimOutcome.NEW]
    claim = recovery.claim(["x", "y"])
    assert (claim.fresh, claim.in_store, claim.busy) == ([False, False], True, 1)
    assert store.claim_pending(["y"], "elsewhere:1", takeover_seconds=60.0) == [ClaimOutcome.NEW]  # y given back
    mine = recovery.claim(["z"])
    recovery.record([OnlineEvent("u", "p", "view", 0.0)], ["z"], mine)
    assert store.claim_pending(["z"], "elsewhere:2") == [ClaimOutcome.DONE]
    store.close()
