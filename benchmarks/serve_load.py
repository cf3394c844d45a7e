"""Load benchmark of the HTTP service (issue #4): latency at a fixed open-loop rate, maximum throughput,
event ingestion, Redis bytes per user, a reload under load, a refused corrupt reload, and FAISS recall.

One run does every phase against one service started here, with its own private redis-server:

1. start redis-server (free port, no persistence, temp dir) and `sharefeed serve --bundle B --workers W`
   with SHAREFEED_REDIS_URL and SHAREFEED_EVENT_LOG set (a temp dir; events are fsync'ed there);
2. warm-up (closed loop on the feed);
3. event ingestion: batches of POST /v1/events, several in flight; events/s;
4. Redis bytes per user: MEMORY USAGE summed over each sampled user's keys;
5. open loop at `--rate` req/s on GET /v1/users/{id}/feed?n=20: requests leave on a fixed schedule
   whatever the answers, and latency is measured from the scheduled send time, so queueing is not
   hidden (no coordinated omission); a first clean phase gives p50/p99, a second one runs a reload of a
   copy of the bundle and a reload of a corrupted copy (which must be refused) while the load goes on;
6. closed loop, a concurrency sweep, on the feed and on /healthz: the best req/s of each, and the ratio;
7. after the service stops: FAISS recall@200 against exact search (benchmarks/faiss_recall.py), and an
   in-process profile of `Recommender.feed` (time per stage, candidates ranked per request, cProfile).

User ids are drawn Zipf-like (s = 1.1 over a random permutation of the bundle's users) mixed with
`--unknown-share` ids the bundle does not know. The client (asyncio + aiohttp) runs in this process and,
for the closed loop, in `--client-procs` processes; it shares the machine's cores with the service, so the
service's own CPU seconds per request are reported too. Usage:

    uv run python benchmarks/serve_load.py --bundle /tmp/serveload/bundle1m --workers 2 \
        --rate 300 --duration 60 --out /tmp/serveload/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import multiprocessing as mp
import os
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import psutil
import pyarrow.parquet as pq
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from faiss_recall import markdown as recall_markdown  # noqa: E402
from faiss_recall import measure_recall  # noqa: E402

Json = dict[str, Any]


# -- users -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class UserSampler:
    """Known ids drawn Zipf-like over a random permutation of the vocabulary, mixed with unknown ids."""

    known: np.ndarray  # object array of the bundle's user ids
    unknown_share: float
    s: float
    rng: np.random.Generator
    _order: np.ndarray = field(init=False)
    _cdf: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self._order = self.rng.permutation(len(self.known))
        weights = np.arange(1, len(self.known) + 1, dtype=np.float64) ** -self.s
        self._cdf = np.cumsum(weights) / weights.sum()

    def draw(self, size: int) -> list[str]:
        ranks = np.minimum(np.searchsorted(self._cdf, self.rng.random(size)), len(self.known) - 1)
        ids = self.known[self._order[ranks]].astype(object)
        unknown = self.rng.random(size) < self.unknown_share
        ids[unknown] = [f"unknown-{x}" for x in self.rng.integers(0, 10**9, int(unknown.sum()))]
        return [str(i) for i in ids]


def _vocabulary(path: Path) -> np.ndarray:
    return np.asarray(pq.read_table(path).column("id").to_pylist(), dtype=object)


# -- processes ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 20.0) -> None:
    """SIGTERM to the process group this script created for `proc`, then SIGKILL after `grace`."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def redis_server(workdir: Path, binary: str) -> Iterator[tuple[str, redis.Redis]]:
    port = _free_port()
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"redis-server did not start (see {workdir / 'redis.log'})")
        yield f"redis://127.0.0.1:{port}/0", client
    finally:
        client.close()
        _stop(proc)
        log.close()


def _serve_supports(flag: str) -> bool:
    out = subprocess.run(["uv", "run", "--frozen", "sharefeed", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return flag in out


@dataclass(slots=True)
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    workers: int
    log_path: Path

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss_mib(self) -> float:
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20


@contextlib.contextmanager
def service(bundle: Path, workers: int, redis_url: str, workdir: Path, timeout: float,
            extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    port = _free_port()
    cmd = ["uv", "run", "--frozen", "sharefeed", "serve", "--bundle", str(bundle), "--port", str(port)]
    effective = 1
    if workers > 1:
        if _serve_supports("--workers"):
            cmd += ["--workers", str(workers)]
            effective = workers
        else:
            print(f"!! `sharefeed serve` has no --workers yet: running one worker instead of {workers}")
    event_log = workdir / "eventlog"
    event_log.mkdir(exist_ok=True)
    env = os.environ | {"SHAREFEED_REDIS_URL": redis_url, "SHAREFEED_EVENT_LOG": str(event_log)} | (extra_env or {})
    log_path = workdir / "server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}", effective, log_path)
    try:
        _wait_ready(server, timeout)
        yield server
    finally:
        _stop(proc)
        log.close()


def _wait_ready(server: Server, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"the service exited: {server.log_path.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{server.base}/readyz", timeout=2) as answer:
            if answer.status == 200:
                break
        time.sleep(0.5)
    else:
        raise RuntimeError(f"the service was not ready after {timeout:.0f}s")
    # With several workers, one may answer /readyz while another still loads the bundle: wait until the
    # service's memory stops growing before measuring anything.
    last = server.rss_mib()
    while time.monotonic() < deadline:
        time.sleep(3.0)
        now = server.rss_mib()
        if now < last * 1.01:
            return
        last = now


def drain(server: Server, limit: float = 180.0) -> float:
    """Wait until /healthz answers within 0.5 s again (an overloaded service works off its backlog of
    requests whose clients gave up); returns the seconds waited."""
    import urllib.request

    began = time.monotonic()
    while time.monotonic() - began < limit:
        start = time.monotonic()
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{server.base}/healthz", timeout=5) as answer:
            if answer.status == 200 and time.monotonic() - start < 0.5:
                return time.monotonic() - began
        time.sleep(1.0)
    return time.monotonic() - began


# -- statistics ----------------------------------------------------------------------------------------------


def _summary(latencies_s: np.ndarray) -> Json:
    ms = 1000.0 * latencies_s[np.isfinite(latencies_s)]
    if not len(ms):
        return {"count": 0}
    p50, p90, p99, p999 = np.percentile(ms, [50, 90, 99, 99.9])
    return {"count": len(ms), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "p999_ms": float(p999), "max_ms": float(ms.max()), "mean_ms": float(ms.mean())}


# -- open loop -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Action:
    """Something to do while the open loop runs (a reload), at `at` seconds after its start."""

    at: float
    name: str
    run: Callable[[aiohttp.ClientSession], Any]
    result: Json = field(default_factory=dict)


async def open_loop(base: str, ids: list[str], rate: float, duration: float, n: int,
                    actions: list[Action] | None = None, timeout: float = 10.0) -> Json:
    """GET the feed of ids[i] at start + i / rate for every i, whatever the answers; latency from schedule."""
    total = int(rate * duration)
    latency = np.full(total, np.nan)
    lag = np.zeros(total)
    status = np.zeros(total, dtype=np.int64)
    versions: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    short = 0
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=1000, force_close=False)
    client_cpu = time.process_time()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        start = loop.time() + 0.1

        async def one(i: int, scheduled: float) -> None:
            nonlocal short
            try:
                async with session.get(f"{base}/v1/users/{ids[i % len(ids)]}/feed", params={"n": str(n)}) as r:
                    body = await r.read()
                    status[i] = r.status
                    if r.status == 200:
                        doc = orjson.loads(body)
                        versions[doc.get("bundle_version", "?")] += 1
                        short += len(doc.get("items", ())) < n
                    else:
                        errors[f"HTTP {r.status}"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                status[i] = -1
                errors[type(exc).__name__] += 1
            latency[i] = loop.time() - scheduled

        async def act(action: Action) -> None:
            await asyncio.sleep(max(0.0, start + action.at - loop.time()))
            began = loop.time()
            action.result = await action.run(session)
            action.result["at_s"] = began - start
            action.result["took_s"] = loop.time() - began

        pending: set[asyncio.Task[None]] = set()
        side = [asyncio.create_task(act(a)) for a in actions or []]
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lag[i] = loop.time() - scheduled
            task = asyncio.create_task(one(i, scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        await asyncio.gather(*side)
        wall = loop.time() - start
    ok = status == 200
    failed = int((~ok).sum())
    return {
        "rate": rate, "duration_s": duration, "sent": total, "ok": int(ok.sum()), "failed": failed,
        "errors": dict(errors), "short_feeds": short, "achieved_rps": total / wall,
        "latency": _summary(latency[ok]), "latency_all": _summary(latency),
        "client_send_lag": _summary(lag), "client_cpu_s": time.process_time() - client_cpu,
        "bundle_versions": dict(versions),
        "actions": {a.name: a.result for a in actions or []},
        "failed_latency_timeline_s": [float(x) for x in np.flatnonzero(~ok)[:50] / rate],
    }


async def _post_reload(session: aiohttp.ClientSession, base: str, bundle: Path) -> Json:
    try:
        async with session.post(f"{base}/v1/admin/reload", json={"bundle": str(bundle)},
                                timeout=aiohttp.ClientTimeout(total=600)) as r:
            text = await r.text()
            return {"status": r.status, "body": text[:500], "bundle": str(bundle)}
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"status": -1, "body": repr(exc), "bundle": str(bundle)}


async def _get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Json | str]:
    async with session.get(url) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text[:500]


# -- closed loop ---------------------------------------------------------------------------------------------


def _closed_worker(base: str, paths: list[str], concurrency: int, duration: float, start_at: float) -> Json:
    """One client process: `concurrency` loops, each sending its next request when the last one answered."""

    async def run() -> Json:
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            loop = asyncio.get_running_loop()
            end = loop.time() + duration
            cpu = time.process_time()

            async def worker(offset: int) -> None:
                i = offset
                while loop.time() < end:
                    began = loop.time()
                    try:
                        async with session.get(base + paths[i % len(paths)]) as r:
                            await r.read()
                            if r.status != 200:
                                errors[f"HTTP {r.status}"] += 1
                                continue
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        errors[type(exc).__name__] += 1
                        continue
                    latencies.append(loop.time() - began)
                    i += concurrency

            await asyncio.gather(*(worker(k) for k in range(concurrency)))
            cpu = time.process_time() - cpu
        return {"latencies": latencies, "errors": dict(errors), "client_cpu_s": cpu}

    return asyncio.run(run())


def closed_loop(server: Server, paths: list[str], concurrency: int, duration: float, procs: int) -> Json:
    """Requests/s with `concurrency` connections spread over `procs` client processes."""
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (k < concurrency % procs) for k in range(procs)]
    start_at = time.time() + 1.5
    cpu_before = server.cpu_seconds()
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_closed_worker, server.base, paths[k::procs], share, duration, start_at)
                   for k, share in enumerate(shares)]
        parts = [f.result() for f in futures]
    server_cpu = server.cpu_seconds() - cpu_before
    latencies = np.concatenate([np.asarray(p["latencies"]) for p in parts])
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p["errors"])
    client_cpu = sum(p["client_cpu_s"] for p in parts)
    ok = len(latencies)
    return {
        "concurrency": concurrency, "client_procs": procs, "duration_s": duration, "ok": ok,
        "errors": dict(errors), "rps": ok / duration, "latency": _summary(latencies),
        "client_cpu_share": client_cpu / duration,  # cores the client used
        "server_cpu_share": server_cpu / duration,  # cores the service used (includes start-up of the pool)
        "server_cpu_ms_per_request": 1000.0 * server_cpu / max(ok, 1),
    }


def sweep(server: Server, paths: list[str], levels: list[int], duration: float, procs: int, label: str) -> Json:
    rows = []
    for c in levels:
        row = closed_loop(server, paths, c, duration, procs)
        rows.append(row)
        print(f"  {label} c={c:>3} procs={row['client_procs']}: {row['rps']:8.1f} req/s, "
              f"p50 {row['latency'].get('p50_ms', float('nan')):.1f} ms, "
              f"p99 {row['latency'].get('p99_ms', float('nan')):.1f} ms, errors {row['errors']}, "
              f"client {row['client_cpu_share']:.2f} cores, server {row['server_cpu_share']:.2f} cores "
              f"({row['server_cpu_ms_per_request']:.2f} ms CPU/req)", flush=True)
    best = max(rows, key=lambda r: r["rps"])
    return {"best": best, "rows": rows}


# -- events and Redis ------------------------------------------------------------------------------------------


EVENT_MIX = (("view", 0.70), ("add_to_cart", 0.14), ("like", 0.06), ("purchase", 0.08), ("share", 0.02))


def make_events(known: np.ndarray, items: np.ndarray, users: int, per_user: float, heavy: int, heavy_events: int,
                now: datetime, rng: np.random.Generator, run: str) -> tuple[list[Json], list[str], list[str]]:
    """Events of `users` users (half known to the bundle, half new), about `per_user` each, plus `heavy`
    users with `heavy_events` each (beyond the per-user cap of the store); shuffled."""
    half = users // 2
    typical = [str(u) for u in rng.choice(known, size=half, replace=False)] + [f"new-{run}-{i}" for i in
                                                                               range(users - half)]
    heavy_ids = [f"heavy-{run}-{i}" for i in range(heavy)]
    counts = np.maximum(1, rng.poisson(per_user, size=users))
    owners = np.concatenate([np.repeat(np.arange(users), counts), np.repeat(users + np.arange(heavy), heavy_events)])
    rng.shuffle(owners)
    everyone = typical + heavy_ids
    names = [t for t, _ in EVENT_MIX]
    kinds = rng.choice(len(names), size=len(owners), p=[p for _, p in EVENT_MIX])
    item_rank = np.minimum((rng.pareto(1.2, size=len(owners)) * 50).astype(np.int64), len(items) - 1)
    seconds = rng.uniform(0, 3600, size=len(owners))
    events = []
    for k, (owner, kind, item, sec) in enumerate(zip(owners.tolist(), kinds.tolist(), item_rank.tolist(),
                                                      seconds.tolist(), strict=True)):
        event: Json = {"event_id": f"{run}-{k}", "user_id": everyone[owner], "item_id": str(items[item]),
                       "event_type": names[kind],
                       "timestamp": (now + timedelta(seconds=sec)).isoformat().replace("+00:00", "Z")}
        if names[kind] == "purchase":
            event["quantity"] = 1
        events.append(event)
    return events, typical, heavy_ids


async def ingest(base: str, events: list[Json], batch: int, in_flight: int) -> Json:
    batches = [events[i : i + batch] for i in range(0, len(events), batch)]
    accepted = 0
    rejected: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    queue: asyncio.Queue[list[Json]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        loop = asyncio.get_running_loop()

        async def worker() -> None:
            nonlocal accepted
            while not queue.empty():
                body = orjson.dumps({"events": queue.get_nowait()})
                began = loop.time()
                async with session.post(f"{base}/v1/events", data=body,
                                        headers={"content-type": "application/json"}) as r:
                    statuses[r.status] += 1
                    text = await r.read()
                latencies.append(loop.time() - began)
                if r.status == 200:
                    doc = orjson.loads(text)
                    accepted += int(doc.get("accepted", 0))
                    for row in doc.get("rejected", []):
                        rejected[str(row.get("reason", "?"))[:80]] += 1
                elif statuses[r.status] <= 3:
                    print(f"  POST /v1/events -> {r.status}: {text[:300]!r}")

        began = loop.time()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        wall = loop.time() - began
    return {"events": len(events), "batches": len(batches), "batch_size": batch, "in_flight": in_flight,
            "accepted": accepted, "rejected": dict(rejected.most_common(10)), "statuses": dict(statuses),
            "wall_s": wall, "events_per_s": accepted / wall if wall else 0.0,
            "batch_latency": _summary(np.asarray(latencies))}


_SPLIT = re.compile(r"[:{}|/\s]+")


def redis_bytes(client: redis.Redis, groups: dict[str, list[str]]) -> Json:
    """MEMORY USAGE summed over each user's keys (keys that carry the user id), per group of users."""
    wanted = {u: g for g, users in groups.items() for u in users}
    per_user: Counter[str] = Counter()
    keys_per_user: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    other_bytes = 0
    other_keys = 0
    for key in client.scan_iter(count=5000):
        text = key.decode(errors="replace")
        owners = [t for t in _SPLIT.split(text) if t in wanted]
        usage = int(client.memory_usage(key, samples=0) or 0)
        if owners:
            for owner in owners:
                per_user[owner] += usage
                keys_per_user[owner] += 1
            kinds[_SPLIT.sub(":", text.replace(owners[0], "{user}"))] += 1
        else:
            other_bytes += usage
            other_keys += 1
    out: Json = {"other_keys": other_keys, "other_bytes": other_bytes,
                 "key_shapes": dict(kinds.most_common(12))}
    for group, users in groups.items():
        values = np.asarray([per_user.get(u, 0) for u in users], dtype=np.float64)
        keys = np.asarray([keys_per_user.get(u, 0) for u in users], dtype=np.float64)
        out[group] = {"users": len(users), "users_with_keys": int((values > 0).sum()),
                      "bytes_mean": float(values.mean()) if len(values) else 0.0,
                      "bytes_p50": float(np.median(values)) if len(values) else 0.0,
                      "bytes_p99": float(np.percentile(values, 99)) if len(values) else 0.0,
                      "bytes_max": float(values.max()) if len(values) else 0.0,
                      "keys_mean": float(keys.mean()) if len(keys) else 0.0}
    return out


def store_user_bytes(redis_url: str, users: list[str]) -> Json | None:
    """The product's own measure (features.online.RedisStore.user_bytes), when it can be built here."""
    from features.online import RedisStore

    store = RedisStore(redis_url)
    values = np.asarray([store.user_bytes(u) for u in users], dtype=np.float64)
    return {"users": len(users), "bytes_mean": float(values.mean()), "bytes_p50": float(np.median(values)),
            "bytes_max": float(values.max())}


# -- bundle copies ---------------------------------------------------------------------------------------------


def linked_copy(bundle: Path, dest: Path) -> Path:
    """A copy of the bundle made of hard links (cheap; the files are never modified in place)."""
    dest.mkdir(parents=True)
    for f in bundle.iterdir():
        if f.is_file():
            os.link(f, dest / f.name)
    return dest


def corrupt_copy(bundle: Path, dest: Path) -> Path:
    """A copy whose item factors differ in a few bytes: the checksum in the manifest no longer matches."""
    linked_copy(bundle, dest)
    target = dest / "item_factors.npy"
    data = bytearray(target.read_bytes())
    target.unlink()  # break the hard link: the original keeps its bytes
    for k in range(len(data) - 64, len(data) - 32):
        data[k] ^= 0xFF
    target.write_bytes(bytes(data))
    return dest


# -- in-process profile ------------------------------------------------------------------------------------------


def profile_feed(bundle_path: str, user_ids: list[str], n: int) -> Json:
    """Time per stage of `Recommender.feed` (wrappers around what it calls) and candidates per request."""
    from serving import recommender as rec_module
    from training.bundle import load_bundle

    started = time.perf_counter()
    bundle = load_bundle(Path(bundle_path))
    load_s = time.perf_counter() - started
    recommender = rec_module.Recommender(bundle)
    stage_s: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    union_sizes: list[int] = []
    retrieve_k: list[int] = []

    def timed(name: str, fn: Callable[..., Any], hook: Callable[[Any, tuple[Any, ...]], None] | None = None
              ) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            out = fn(*args, **kwargs)
            stage_s[name] += time.perf_counter() - began
            calls[name] += 1
            if hook is not None:
                hook(out, args)
            return out

        return wrapper

    for name in ("merge_candidates", "user_candidates", "candidate_features", "compose_feed", "top_scores"):
        fn = getattr(rec_module, name, None)
        if fn is not None:
            hook = (lambda out, _args: union_sizes.append(len(out[0]))) if name == "merge_candidates" else None
            setattr(rec_module, name, timed(name, fn, hook))
    for name in ("_blocked", "_retrieve", "_items", "_rank", "_anchors"):
        fn = getattr(recommender, name, None)
        if fn is not None:
            setattr(recommender, name, timed(name, fn))
    index = bundle.index
    search = index.search

    def counted_search(x: np.ndarray, k: int, *rest: Any, **kw: Any) -> Any:
        retrieve_k.append(int(k))
        began = time.perf_counter()
        out = search(x, k, *rest, **kw)
        stage_s["faiss search"] += time.perf_counter() - began
        calls["faiss search"] += 1
        return out

    with contextlib.suppress(AttributeError, TypeError):
        index.search = counted_search
    ranker = getattr(recommender, "_ranker", None)
    if ranker is not None:

        class _Timed:
            def predict(self, x: np.ndarray) -> np.ndarray:
                began = time.perf_counter()
                out = ranker.predict(x)
                stage_s["ranker predict"] += time.perf_counter() - began
                calls["ranker predict"] += 1
                return out  # type: ignore[no-any-return]

        recommender._ranker = _Timed()
    for u in user_ids[:50]:  # warm-up
        recommender.feed(u, n)
    stage_s.clear()
    calls.clear()
    union_sizes.clear()
    retrieve_k.clear()
    known = sum(bundle.users.index_of(u) is not None for u in user_ids)
    began = time.perf_counter()
    for u in user_ids:
        recommender.feed(u, n)
    total = time.perf_counter() - began
    stages = {k: 1000.0 * v / len(user_ids) for k, v in stage_s.most_common()}
    stage_calls = dict(calls)
    profiler = cProfile.Profile()
    profiler.enable()
    for u in user_ids[:300]:
        recommender.feed(u, n)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
    sizes = np.asarray(union_sizes or [0])
    return {
        "bundle_load_s": load_s, "requests": len(user_ids), "known_users": known,
        "ms_per_feed": 1000.0 * total / len(user_ids),
        "stage_ms_per_feed": stages,  # nested: _rank includes the stages it calls
        "stage_calls": stage_calls,
        "candidates_ranked": {"requests_ranked": len(union_sizes), "min": int(sizes.min()),
                              "p5": float(np.percentile(sizes, 5)), "median": float(np.median(sizes)),
                              "share_at_least_200": float((sizes >= 200).mean())},
        "union_size_setting": bundle.manifest.union_size,
        "candidate_settings": bundle.manifest.candidates,
        "faiss_k_requested": {"median": float(np.median(retrieve_k)) if retrieve_k else None,
                              "max": max(retrieve_k) if retrieve_k else None},
        "cprofile_top": text.getvalue()[:6000],
    }


# -- the run ----------------------------------------------------------------------------------------------------


def _pct(d: Json, key: str) -> str:
    v = d.get(key)
    return "-" if v is None else f"{v:.1f}"


def report(results: Json) -> str:
    lines = ["| measure | value | target |", "|---|---|---|"]
    ol = results.get("open_loop")
    if ol:
        lat = ol["latency"]
        lines.append(f"| feed, open loop {ol['rate']:.0f} req/s for {ol['duration_s']:.0f} s: p50 / p90 / p99 / max "
                     f"| {_pct(lat, 'p50_ms')} / {_pct(lat, 'p90_ms')} / {_pct(lat, 'p99_ms')} / "
                     f"{_pct(lat, 'max_ms')} ms ({ol['failed']} failed of {ol['sent']}) | p99 <= 25 ms |")
    rl = results.get("open_loop_reload")
    if rl:
        lat = rl["latency"]
        acts = rl["actions"]
        lines.append(f"| feed, open loop during reloads: p50 / p99 / max; failed | {_pct(lat, 'p50_ms')} / "
                     f"{_pct(lat, 'p99_ms')} / {_pct(lat, 'max_ms')} ms; {rl['failed']} failed of {rl['sent']} "
                     f"| 0 failed |")
        for name, a in acts.items():
            lines.append(f"| POST /v1/admin/reload ({name}) | HTTP {a.get('status')} in {a.get('took_s', 0):.1f} s "
                         f"| {'2xx' if name == 'copy' else 'refused (non-2xx), old bundle serving'} |")
        if "after_corrupt" in results:
            lines.append(f"| serving after the corrupt reload | {results['after_corrupt']} | same version |")
    feed, health = results.get("closed_feed"), results.get("closed_healthz")
    if feed:
        b = feed["best"]
        lines.append(f"| feed, max throughput (closed loop, c={b['concurrency']}) | {b['rps']:.0f} req/s "
                     f"(p50 {_pct(b['latency'], 'p50_ms')} ms, p99 {_pct(b['latency'], 'p99_ms')} ms; service "
                     f"{b['server_cpu_ms_per_request']:.2f} ms CPU/req) | >= 500 req/s |")
    if health:
        b = health["best"]
        lines.append(f"| /healthz, max throughput (c={b['concurrency']}) | {b['rps']:.0f} req/s (client used "
                     f"{b['client_cpu_share']:.2f} cores; service {b['server_cpu_ms_per_request']:.2f} ms CPU/req) "
                     f"| - |")
    if feed and health:
        lines.append(f"| feed / bare endpoint throughput | {feed['best']['rps'] / health['best']['rps']:.2f} | - |")
    ing = results.get("ingestion")
    if ing and "events_per_s" in ing:
        lines.append(f"| event ingestion (batches of {ing['batch_size']}, {ing['in_flight']} in flight, fsync) | "
                     f"{ing['events_per_s']:.0f} events/s ({ing['accepted']:,} accepted of {ing['events']:,}) "
                     f"| >= 5,000 events/s |")
    rb = results.get("redis_bytes")
    if rb and "typical" in rb:
        t, h = rb["typical"], rb.get("heavy", {})
        lines.append(f"| Redis bytes per user (~{results.get('events_per_typical_user', 0):.1f} events) | "
                     f"mean {t['bytes_mean']:.0f}, p99 {t['bytes_p99']:.0f} B | <= 1 KB |")
        if h:
            lines.append(f"| Redis bytes per user at the cap ({results.get('heavy_events')} events) | "
                         f"mean {h['bytes_mean']:.0f} B | <= 1 KB |")
    rec = results.get("recall")
    if rec:
        served = int(rec["manifest_ef_search"]) if rec["manifest_index"] == "hnsw" else 0
        rows = [r for r in rec["rows"] if r["index"].startswith(("bundle", "BPR")) and r["ef_search"] in (served, 0)]
        for row in rows:
            setting = f" at efSearch {served}" if row["ef_search"] else ""
            lines.append(f"| FAISS recall@{rec['k']}{setting}, {row['index']} | {row['recall']:.4f} "
                         f"({row['ms_mean']:.2f} ms/query) | >= 0.95 |")
    prof = results.get("profile")
    if prof:
        c = prof["candidates_ranked"]
        lines.append(f"| candidates ranked per personalized request (in process) | min {c['min']}, median "
                     f"{c['median']:.0f}; {c['share_at_least_200']:.1%} >= 200 | >= 200 |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Json:
    bundle = args.bundle.resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    rng = np.random.default_rng(args.seed)
    users = _vocabulary(bundle / "users.parquet")
    items = _vocabulary(bundle / "items.parquet")
    sampler = UserSampler(users, args.unknown_share, args.zipf, rng)
    results: Json = {
        "command": " ".join(sys.argv), "started": datetime.now(UTC).isoformat(), "bundle": str(bundle),
        "bundle_version": manifest["bundle_version"], "bundle_counts": manifest["counts"],
        "union_size": manifest["union_size"], "candidates": manifest["candidates"],
        "index": {"kind": manifest["model"]["index_kind"], "ef_search": manifest["model"]["ef_search"]},
        "n": args.n, "unknown_share": args.unknown_share, "zipf_s": args.zipf, "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "pythonpath": os.environ.get("PYTHONPATH"),  # a code snapshot (git archive) when the tree is in flux
        "git_head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                   text=True).stdout.strip(),
    }
    work = Path(tempfile.mkdtemp(prefix="serve_load.", dir=args.workdir))
    print(f"work dir {work}")
    try:
        with redis_server(work, args.redis_server) as (redis_url, client), \
                service(bundle, args.workers, redis_url, work, args.ready_timeout,
                        dict(kv.split("=", 1) for kv in args.server_env)) as server:
            results["server_env"] = args.server_env
            results["workers"] = server.workers
            results["server_rss_mib_ready"] = server.rss_mib()
            print(f"service ready at {server.base} with {server.workers} worker(s), "
                  f"RSS {results['server_rss_mib_ready']:.0f} MiB")
            feed_ids = sampler.draw(200_000)
            results["unknown_share_drawn"] = float(np.mean([u.startswith("unknown-") for u in feed_ids]))
            feed_paths = [f"/v1/users/{u}/feed?n={args.n}" for u in feed_ids]

            print("warm-up ...", flush=True)
            results["warmup"] = closed_loop(server, feed_paths, 8, args.warmup, 1)

            if not args.skip_events:
                print("event ingestion ...", flush=True)
                now = datetime.fromisoformat(manifest["data_window"]["end"]) + timedelta(minutes=1)
                events, typical, heavy = make_events(users, items, args.event_users, args.events_per_user,
                                                     args.heavy_users, args.heavy_events, now, rng, "sl")
                results["events_per_typical_user"] = (len(events) - args.heavy_users * args.heavy_events) / len(
                    typical)
                results["heavy_events"] = args.heavy_events
                memory_before = int(client.info("memory")["used_memory"])
                results["ingestion"] = asyncio.run(ingest(server.base, events, args.batch, args.in_flight))
                memory_after = int(client.info("memory")["used_memory"])
                results["redis_used_memory_delta_per_user"] = (memory_after - memory_before) / (
                    len(typical) + len(heavy))
                print(f"  {results['ingestion']['events_per_s']:.0f} events/s; statuses "
                      f"{results['ingestion']['statuses']}", flush=True)
                sample = [str(u) for u in rng.choice(np.asarray(typical, dtype=object), size=min(2000, len(typical)),
                                                     replace=False)]
                results["redis_bytes"] = redis_bytes(client, {"typical": sample, "heavy": heavy})
                results["redis_dbsize"] = int(client.dbsize())
                results["store_user_bytes"] = store_user_bytes(redis_url, sample[:200])
                print(f"  redis bytes: {json.dumps({k: results['redis_bytes'][k] for k in ('typical', 'heavy')})}")

            print(f"open loop at {args.rate} req/s for {args.duration} s ...", flush=True)
            cpu0 = server.cpu_seconds()
            results["open_loop"] = asyncio.run(open_loop(server.base, sampler.draw(int(args.rate * args.duration)),
                                                         args.rate, args.duration, args.n))
            results["open_loop"]["server_cpu_share"] = (server.cpu_seconds() - cpu0) / args.duration
            print(f"  {json.dumps(results['open_loop']['latency'])}; failed {results['open_loop']['failed']} "
                  f"{results['open_loop']['errors']}", flush=True)
            results["open_loop"]["drain_s"] = drain(server)

            if not args.skip_reload:
                copy = args.reload_bundle.resolve() if args.reload_bundle else linked_copy(bundle, work / "bundle-copy")
                broken = corrupt_copy(bundle, work / "bundle-corrupt")
                actions = [
                    Action(args.reload_duration * 0.25, "copy",
                           lambda s: _post_reload(s, server.base, copy)),
                    Action(args.reload_duration * 0.6, "corrupt",
                           lambda s: _post_reload(s, server.base, broken)),
                ]
                print(f"open loop with reloads for {args.reload_duration} s ...", flush=True)
                results["open_loop_reload"] = asyncio.run(open_loop(
                    server.base, sampler.draw(int(args.rate * args.reload_duration)), args.rate,
                    args.reload_duration, args.n, actions))
                print(f"  {json.dumps(results['open_loop_reload']['actions'])[:800]}")
                print(f"  failed {results['open_loop_reload']['failed']}: {results['open_loop_reload']['errors']}")

                async def after() -> Json:
                    async with aiohttp.ClientSession() as s:
                        ready = await _get_json(s, f"{server.base}/readyz")
                        feed = await _get_json(s, f"{server.base}/v1/users/{feed_ids[0]}/feed?n={args.n}")
                    return {"readyz": ready, "feed_status": feed[0]}

                results["open_loop_reload"]["drain_s"] = drain(server)
                results["after_corrupt"] = asyncio.run(after())

            print("closed loop, feed ...", flush=True)
            results["closed_feed"] = sweep(server, feed_paths, args.concurrency, args.closed_duration,
                                           args.client_procs, "feed")
            print("closed loop, /healthz ...", flush=True)
            health = [sweep(server, ["/healthz"] * 1000, args.concurrency, args.closed_duration, procs, "healthz")
                      for procs in args.healthz_client_procs]
            # The best over client process counts: a higher figure with more client processes means one
            # client process was the limit (its ceiling is then the 1-process figure).
            results["closed_healthz"] = {"best": max((h["best"] for h in health), key=lambda r: r["rps"]),
                                         "by_client_procs": health}
            results["server_rss_mib_end"] = server.rss_mib()

            async def metrics() -> Json:
                async with aiohttp.ClientSession() as s, s.get(f"{server.base}/metrics") as r:
                    text = await r.text()
                    keep = [line for line in text.splitlines() if not line.startswith("#") and "_bucket" not in line
                            and re.search(r"candidate|rank|reload|bundle|event|request", line)]
                    sums: dict[str, float] = {}
                    counts: dict[str, float] = {}
                    for line in keep:
                        found = re.match(r'sharefeed_request_seconds_(sum|count)\{endpoint="([^"]+)".*\} (\S+)', line)
                        if found:
                            (sums if found[1] == "sum" else counts)[found[2]] = float(found[3])
                    handler_ms = {e: 1000.0 * sums[e] / counts[e] for e in sums if counts.get(e)}
                    return {"status": r.status, "handler_mean_ms": handler_ms, "lines": keep[:80]}

            with contextlib.suppress(aiohttp.ClientError):
                results["metrics"] = asyncio.run(metrics())
        results["server_log_tail"] = (work / "server.log").read_text(errors="replace")[-4000:]
    finally:
        if not args.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)

    if not args.skip_recall:
        print("FAISS recall ...", flush=True)
        results["recall"] = measure_recall(bundle, args.recall_users, 200, args.ef_search, timed=300,
                                           served_k=args.served_k)
        print(recall_markdown(results["recall"]))
    if not args.skip_profile:
        print("in-process profile of Recommender.feed ...", flush=True)
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            results["profile"] = pool.submit(profile_feed, str(bundle), sampler.draw(args.profile_requests),
                                             args.n).result()
        print(json.dumps({k: v for k, v in results["profile"].items() if k != "cprofile_top"}, indent=1))
    results["finished"] = datetime.now(UTC).isoformat()
    results["load_average_at_end"] = os.getloadavg()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=300.0, help="open-loop arrivals per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the clean open-loop phase")
    parser.add_argument("--reload-duration", type=float, default=60.0, help="seconds of the open loop with reloads")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--closed-duration", type=float, default=10.0, help="seconds per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--client-procs", type=int, default=1, help="client processes of the feed's closed loop")
    parser.add_argument("--healthz-client-procs", type=int, nargs="+", default=[1, 2],
                        help="client process counts tried on /healthz (to find the client's own ceiling)")
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--unknown-share", type=float, default=0.25)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--event-users", type=int, default=25_000)
    parser.add_argument("--events-per-user", type=float, default=8.0)
    parser.add_argument("--heavy-users", type=int, default=200)
    parser.add_argument("--heavy-events", type=int, default=60)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--recall-users", type=int, default=2000)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--served-k", type=int, nargs="*", default=[200, 500, 2000, 6200])
    parser.add_argument("--profile-requests", type=int, default=2000)
    parser.add_argument("--reload-bundle", type=Path, default=None,
                        help="bundle to reload under load (default: a hard-linked copy of --bundle)")
    parser.add_argument("--server-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra environment of the service, e.g. OMP_NUM_THREADS=1")
    parser.add_argument("--skip-events", action="store_true")
    parser.add_argument("--skip-reload", action="store_true")
    parser.add_argument("--skip-recall", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "/usr/bin/redis-server")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (default: system temp)")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("serve_load_results.json"))
    args = parser.parse_args()
    results = run(args)
    table = report(results)
    results["table"] = table
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print()
    print(table)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
