"""Faults: a Redis server killed and restarted under the service, a full event-log disk, a service killed
between the log append and the acknowledgement.

Each Redis here is a private redis-server on a free port that the test kills with SIGKILL and starts again
on the same port: without persistence it comes back empty (the service rebuilds it from the event log); with
a snapshot saved just before the kill it comes back with its data (the service records what it missed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx
import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from features.eventlog import CONTROL, EVENTS, EventLog
from features.online import MemoryStore, RedisStore
from features.store import OnlineEvent
from features.weights import DEFAULT_EVENT_WEIGHTS
from serving import metrics
from serving.app import create_app
from serving.recovery import Recovery
from serving.settings import ServingSettings
from training.bundle import Bundle, load_bundle
from training.pipeline import TrainResult

ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a Redis server the test may kill -------------------------------------------------------------------------
class RedisProcess:
    def __init__(self, workdir: Path) -> None:
        binary = REDIS_SERVER if os.path.exists(REDIS_SERVER) else shutil.which("redis-server")
        if binary is None:
            pytest.skip("no redis-server binary: the fault tests start and kill their own")
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.workdir / "redis.log"
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", "",
             "--appendonly", "no", "--dbfilename", "dump.rdb", "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()[-2000:]
            with contextlib.suppress(redis.ConnectionError), redis.Redis.from_url(self.url) as client:
                if client.ping():
                    return
            time.sleep(0.02)
        pytest.fail(f"redis-server did not answer: {log.read_text()[-2000:]}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    (tmp_path / "redis").mkdir()
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bundle(trained: TrainResult) -> Bundle:
    return load_bundle(trained.bundle_path)


def _settings(redis_url: str, prefix: str, log: Path) -> ServingSettings:
    return ServingSettings(redis_url=redis_url, redis_prefix=prefix, event_log=log, recovery_poll_seconds=0.05,
                           reload_poll_seconds=0.1, overlay_refresh_seconds=0.0)


@contextlib.contextmanager
def _service(bundle: Bundle, redis_url: str, log: Path) -> Iterator[tuple[TestClient, RedisStore]]:
    prefix = f"sft:{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_url, prefix)
    with TestClient(create_app(_settings(redis_url, prefix, log), bundle=bundle, store=store)) as client:
        yield client, store
    store.close()


def _event(user: str, item: str, kind: str = "view", ts: float | None = None) -> dict[str, object]:
    stamp = datetime.fromtimestamp(time.time() - 1 if ts is None else ts, UTC).isoformat()
    return {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item, "event_type": kind, "timestamp": stamp}


def _post(client: TestClient, events: list[dict[str, object]]) -> dict[str, Any]:
    answer = client.post("/v1/events", json={"events": events})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _wait_ready(client: TestClient, timeout: float = 10.0) -> None:
    recovery: Recovery = client.app.state.service.recovery  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while not recovery.ready:
        assert time.monotonic() < deadline, "the online store was not back in line in time"
        time.sleep(0.02)


def _metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not in /metrics"
    return values[0]


def _logged_ids(log: Path) -> Counter[str]:
    ids: Counter[str] = Counter()
    for path in sorted((log / EVENTS).glob("*.jsonl")):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"torn last line in {path}"
        for line in data.splitlines():
            ids[str(orjson.loads(line)["event_id"])] += 1
    return ids


# -- Redis down, then back empty or with its data ------------------------------------------------------------
def test_redis_killed_and_restarted_empty_is_rebuilt_from_the_log(bundle: Bundle, redis_server: RedisProcess,
                                                                  tmp_path: Path) -> None:
    users = bundle.users.ids[:6].tolist()
    items = bundle.items.ids[:40].tolist()
    opted_out, erased, shopper, late_opt_out = users[0], users[1], users[2], users[3]
    hot = items[0]  # bought by everyone: its trending count says whether anything was counted twice
    weight = DEFAULT_EVENT_WEIGHTS["purchase"]
    log = tmp_path / "log"
    with _service(bundle, redis_server.url, log) as (client, store):
        assert client.put(f"/v1/users/{opted_out}/consent", json={"personalization": False}).status_code == 200
        assert client.delete(f"/v1/users/{erased}").status_code == 202
        before = [_event(shopper, item) for item in items[1:6]] + [_event(u, hot, "purchase") for u in users[2:]]
        assert _post(client, before)["online_updated"] is True

        redis_server.kill()
        feed = client.get(f"/v1/users/{shopper}/feed", params={"n": 10})
        assert feed.status_code == 200
        assert feed.json()["degraded"] is True
        answer = client.get(f"/v1/users/{opted_out}/feed", params={"n": 10})
        assert answer.status_code == 200
        assert answer.json()["personalized"] is False  # consent read from the event log while Redis is away
        during = [_event(shopper, item) for item in items[6:11]] + [_event(u, hot, "purchase") for u in users[2:]]
        accepted = _post(client, during)
        assert (accepted["accepted"], accepted["online_updated"]) == (len(during), False)
        assert _post(client, during)["duplicates"] == len(during)  # a retry to this process is not logged twice
        consent = client.put(f"/v1/users/{late_opt_out}/consent", json={"personalization": False})
        assert consent.status_code == 200
        assert consent.json()["personalization"] is False
        assert client.get(f"/v1/users/{late_opt_out}/feed").json()["personalized"] is False
        trending = client.get("/v1/trending", params={"n": 5})
        assert trending.status_code == 200
        assert trending.json()["degraded"] is True
        assert client.get(f"/v1/items/{items[1]}/similar").status_code == 200
        refused = client.put(f"/v1/items/{items[1]}", json={"price": 1.0})  # the catalog overlay lives in Redis
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"]
        assert "online store is unavailable" in refused.json()["detail"]
        segment = client.post("/v1/segments/query", json={"definition": {"kind": "lifecycle"}, "page_size": 1000})
        assert segment.status_code == 200, segment.text  # consent and erasure from the event log's ledger
        assert erased not in {m["user_id"] for m in segment.json()["items"]}
        assert _metric(client.get("/metrics").text, "sharefeed_online_store_up") == 0

        redis_server.start()  # empty: nothing persisted
        _wait_ready(client)
        recent = {e.item_id for e in store.recent(shopper)}
        assert set(items[1:11]) <= recent  # before and during the outage
        assert store.consent(opted_out)["personalization"] is False
        assert store.consent(late_opt_out)["personalization"] is False  # changed while Redis was away
        assert store.erased([erased]) == [True]
        scores = dict(store.trending(1, 10))
        assert scores[hot] == pytest.approx(weight * 2 * len(users[2:]))  # each purchase counted once
        assert not any(store.claim_event_ids([str(e["event_id"]) for e in before + during]))  # retries stay no-ops
        assert client.get(f"/v1/users/{opted_out}/feed").json()["personalized"] is False
        after = client.get(f"/v1/users/{shopper}/feed", params={"n": 10}).json()
        assert after["degraded"] is False
        assert after["personalized"] is True
        assert _metric(client.get("/metrics").text, "sharefeed_online_store_up") == 1
    assert sum(_logged_ids(log).values()) == len(before) + len(during)


def test_redis_back_with_its_data_gets_the_backlog_once(bundle: Bundle, redis_server: RedisProcess,
                                                        tmp_path: Path) -> None:
    users = bundle.users.ids[:8].tolist()
    hot = bundle.items.ids[0]
    weight = DEFAULT_EVENT_WEIGHTS["purchase"]
    with _service(bundle, redis_server.url, tmp_path / "log") as (client, store):
        _post(client, [_event(u, hot, "purchase") for u in users[:3]])
        store.client.save()  # a snapshot: the server comes back with it, generation included
        redis_server.kill()
        during = [_event(u, hot, "purchase") for u in users[3:]]
        assert _post(client, during[:2])["online_updated"] is False
        assert _post(client, during[2:])["online_updated"] is False
        reloaded = client.post("/v1/admin/reload", json={"bundle": str(bundle.path)})
        assert reloaded.status_code == 200, reloaded.text  # this worker reloads; the others learn it later
        redis_server.start()
        _wait_ready(client)
        pointer = store.bundle_pointer()
        assert pointer is not None
        assert str(bundle.path) in pointer  # written once the store was back
        assert dict(store.trending(1, 5))[hot] == pytest.approx(weight * len(users))
        assert {e.item_id for e in store.recent(users[-1])} == {hot}
        assert not any(store.claim_event_ids([str(e["event_id"]) for e in during]))


def test_only_one_worker_rebuilds_an_emptied_store(redis_server: RedisProcess, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    now = time.time()
    # One timestamp for all: trending counts per hour, and spreading them over minutes would let an hour
    # boundary fall among them (the older ones then decay and the sum is not exactly 300 purchases).
    with EventLog(log_dir) as log:
        log.append([{"event_id": f"e{k}", "user_id": f"u{k % 7}", "item_id": "p1", "event_type": "purchase",
                     "timestamp": datetime.fromtimestamp(now, UTC).isoformat()} for k in range(300)])
    prefix = f"sft:{uuid.uuid4().hex[:8]}:"
    stores = [RedisStore(redis_server.url, prefix) for _ in range(3)]
    workers = [Recovery(s, log_dir, window_seconds=86_400.0, backlog_limit=100, poll_seconds=0.05) for s in stores]
    rebuilds = metrics.REBUILDS._value.get()
    threads = [threading.Thread(target=w.check) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in workers:
        worker.check()  # the ones that found the lock taken look again
        assert worker.ready
    assert metrics.REBUILDS._value.get() - rebuilds == 1
    assert stores[0].trending(24, 1)[0][1] == pytest.approx(DEFAULT_EVENT_WEIGHTS["purchase"] * 300)


def test_backlog_overflow_reads_the_outage_back_from_the_log(redis_server: RedisProcess, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    prefix = f"sft:{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_server.url, prefix)
    recovery = Recovery(store, log_dir, window_seconds=86_400.0, backlog_limit=5, poll_seconds=0.05)
    recovery.check()
    assert recovery.ready
    store.client.save()
    redis_server.kill()
    now = time.time()
    with EventLog(log_dir) as log:
        for k in range(4):  # 4 batches of 3 events: the backlog holds 5
            rows = [{"event_id": f"b{k}-{j}", "user_id": f"u{j}", "item_id": "p1", "event_type": "purchase",
                     "timestamp": datetime.fromtimestamp(now, UTC).isoformat()} for j in range(3)]
            claim = recovery.claim([str(r["event_id"]) for r in rows])
            assert all(claim.fresh)
            log.append(rows)
            assert not recovery.record([OnlineEvent(f"u{j}", "p1", "purchase", now) for j in range(3)],
                                       [str(r["event_id"]) for r in rows], claim)
    redis_server.start()
    recovery.check()
    assert recovery.ready
    assert store.trending(1, 1)[0][1] == pytest.approx(DEFAULT_EVENT_WEIGHTS["purchase"] * 12)
    store.close()


# -- a full event-log disk -------------------------------------------------------------------------------------
def fill_log(log_dir: Path, make_room: Callable[[], None]) -> dict[str, Any]:
    """Post event batches, then consent changes (2 KB rows), each until the log refuses one; make room, and
    send the refused ones again. What was acknowledged, refused and answered, as JSON."""
    def batch(k: int) -> list[dict[str, object]]:
        return [{"event_id": f"b{k}-{j}", "user_id": f"u{j}", "item_id": "p" + "x" * 200, "event_type": "view",
                 "timestamp": "2026-11-25T10:00:00Z"} for j in range(20)]

    def fill(send: Callable[[Any], Any], make: Callable[[int], Any]) -> tuple[list[Any], dict[str, Any]]:
        acked: list[Any] = []
        for k in range(100_000):
            body = make(k)
            answer = send(body)
            if answer.status_code != 200:
                return acked, {"status": answer.status_code, "retry_after": answer.headers.get("retry-after"),
                               "detail": answer.json()["detail"], "body": body}
            acked.append(body)
        raise AssertionError("the log never refused a write")

    with TestClient(create_app(ServingSettings(event_log=log_dir), store=MemoryStore())) as client:
        def events(body: list[dict[str, object]]) -> Any:
            return client.post("/v1/events", json={"events": body})

        def consent(user: str) -> Any:
            return client.put(f"/v1/users/{user}/consent", json={"marketing": False})

        acked, failed = fill(events, batch)
        users, refused = fill(consent, lambda k: f"u{k:04d}" + "x" * 2000)
        make_room()
        retried = events(failed["body"])
        return {"acked": [e["event_id"] for b in acked for e in b], "failed": failed, "users": users,
                "refused": refused, "retry": {"status": retried.status_code, **retried.json()},
                "consent_retry": consent(refused["body"]).status_code}


# Where a tmpfs cannot be mounted: no file of the process may grow past 256 KiB (writes fail with EFBIG).
_UNDER_RLIMIT = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
    from tests.test_faults import fill_log
    lift = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print(json.dumps(fill_log(Path(sys.argv[1]), lift)))
""")


def _mount_tmpfs(directory: Path) -> str | None:
    """None when a 256 KiB tmpfs is mounted on `directory`, else why it could not be."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return "not root"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited with {done.returncode}")


def _whole_lines(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"torn last line in {path}"
        rows += [orjson.loads(line) for line in data.splitlines()]
    return rows


def test_a_full_event_log_disk_is_a_clear_503_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    refused = _mount_tmpfs(log_dir)
    mode = "tmpfs" if refused is None else "rlimit"
    if refused is not None:
        print(f"tmpfs not mounted ({refused}): the file size limit (RLIMIT_FSIZE) stands in for a full disk")
    try:
        if mode == "tmpfs":
            ballast = log_dir / "ballast"
            ballast.write_bytes(b"\0" * 32 * 1024)  # freed once the disk is full
            out = fill_log(log_dir, ballast.unlink)
        else:
            done = subprocess.run([sys.executable, "-c", _UNDER_RLIMIT, str(log_dir)], cwd=ROOT, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-3000:]
            out = json.loads(done.stdout.strip().splitlines()[-1])
        for failed in (out["failed"], out["refused"]):
            assert failed["status"] == 503
            assert failed["retry_after"] is not None
            assert "not stored, retry later" in failed["detail"]
        assert out["acked"], "no event was written before the disk was full"
        logged = Counter(str(row["event_id"]) for row in _whole_lines(sorted((log_dir / EVENTS).glob("*.jsonl"))))
        failed_ids = [str(e["event_id"]) for e in out["failed"]["body"]]
        assert all(logged[i] == 1 for i in out["acked"])  # acknowledged: there, once
        assert out["retry"]["status"] == 200
        assert out["retry"]["accepted"] == len(failed_ids)
        assert all(logged[i] == 1 for i in failed_ids)  # the refused batch: not half there, then whole, once
        assert sum(logged.values()) == len(out["acked"]) + len(failed_ids)
        assert out["users"], "no consent was written before the disk was full"
        consents = Counter(str(r["user_id"]) for r in _whole_lines(sorted((log_dir / CONTROL).glob("*.jsonl"))))
        assert out["consent_retry"] == 200
        assert consents == Counter([*out["users"], out["refused"]["body"]])
    finally:
        if mode == "tmpfs":
            subprocess.run(["umount", str(log_dir)], check=False)


# -- the service killed between the log append and the acknowledgement ------------------------------------
def _start_server(bundle: Path, log: Path, port: int, stderr: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SHAREFEED_EVENT_LOG": str(log), "SHAREFEED_RECOVERY_POLL_SECONDS": "0.2"}
    env.pop("SHAREFEED_REDIS_URL", None)  # the in-process store: everything it knew dies with the process
    with stderr.open("ab") as err:
        return subprocess.Popen([sys.executable, "-m", "sharefeed.cli", "serve", "--bundle", str(bundle), "--port",
                                 str(port)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)


def _wait_up(base: str, process: subprocess.Popen[bytes], stderr: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, stderr.read_text()[-2000:]
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"service did not start: {stderr.read_text()[-2000:]}")


def test_a_crash_between_append_and_ack_loses_no_acknowledged_event(trained: TrainResult, tmp_path: Path) -> None:
    log = tmp_path / "log"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    stderr = tmp_path / "serve.log"
    users, items = ["u1", "u2", "u3"], ["p1", "p2", "p3"]
    batches = [[{**_event(users[j % 3], items[j % 3]), "event_id": f"t{t}-b{k}-{j}"} for j in range(25)]
               for t in range(4) for k in range(400)]
    acked: list[list[dict[str, object]]] = []
    unacked: list[list[dict[str, object]]] = []
    lock = threading.Lock()
    process = _start_server(trained.bundle_path, log, port, stderr)
    try:
        _wait_up(base, process, stderr)

        def client(mine: list[list[dict[str, object]]]) -> None:
            with httpx.Client(timeout=10) as http:
                for batch in mine:  # until the first batch without an answer (the rest is never sent)
                    try:
                        ok = http.post(f"{base}/v1/events", json={"events": batch}).status_code == 200
                    except httpx.TransportError:
                        ok = False
                    with lock:
                        (acked if ok else unacked).append(batch)
                    if not ok:
                        return

        threads = [threading.Thread(target=client, args=(batches[t::4],)) for t in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)  # mid-load: batches in every stage of ingestion
        process.wait(timeout=10)
        for thread in threads:
            thread.join()
        assert len(acked) >= 60, "the kill came too early"
        assert unacked, "the kill did not land mid-load"

        process = _start_server(trained.bundle_path, log, port, stderr)  # the same log
        _wait_up(base, process, stderr)
        logged = _logged_ids(log)  # after the restart: whole lines only
        acked_ids = [str(e["event_id"]) for batch in acked for e in batch]
        assert [i for i in acked_ids if logged[i] != 1] == []
        with httpx.Client(timeout=10) as http:  # the client retries what was not acknowledged
            for batch in unacked:
                answer = http.post(f"{base}/v1/events", json={"events": batch})
                assert answer.status_code == 200, answer.text
        logged = _logged_ids(log)
        every = [str(e["event_id"]) for batch in acked + unacked for e in batch]
        assert [i for i in every if logged[i] != 1] == []  # logged before the crash and retried: still once
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
