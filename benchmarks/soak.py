"""Load and faults (issue #7): feeds and events at a steady rate while the Redis server is killed and
restarted and the bundle is hot-reloaded; then what was lost, duplicated or refused, and whether consent and
erasure are still in force.

Everything runs on loopback, started here and stopped at the end:

1. a bundle (`--bundle`, or a small synthetic one made with `sharefeed demo-data` and `sharefeed train`,
   kept in the work directory for the next run) and a second version of it for the reload;
2. a private redis-server (free port, no persistence) and `sharefeed serve --workers 2` with API keys, a
   rate limit, named social proof, and a fresh event log;
3. before the load: a few users opt out (personalization, marketing), a few are erased (members of a
   segment, a friend named in someone's social proof), each checked through the API at once;
4. the load, open loop (requests leave on schedule whatever the answers; latency from the scheduled time):
   GET feed at `--rate`, POST /v1/events batches at `--event-rate` with unique event ids, for `--seconds`
   or `--max-requests`, whichever comes first;
5. during it: kill -9 of redis-server at a quarter of the run, a restart (empty) `--outage` seconds later,
   and POST /v1/admin/reload with the second bundle at 60% of the run;
6. after it: the store back up in every worker; the acknowledged events found in the log (exactly once),
   the users' online state at the newest acknowledged event, the opt-outs and erasures checked again
   through the API; a JSON summary and a markdown table. Exit 1 when a goal is missed.

    nice uv run python benchmarks/soak.py --seconds 150 --out /tmp/soak/summary.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pyarrow.parquet as pq
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from features.keys import Keys, hour_of  # noqa: E402
from features.online import RedisStore  # noqa: E402
from features.weights import DEFAULT_EVENT_WEIGHTS  # noqa: E402

Json = dict[str, Any]
PREFIX = "soak:"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sharefeed(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(["uv", "run", "--frozen", "sharefeed", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sharefeed {' '.join(args)} failed: {done.stderr[-3000:]}")
    return done.stdout


# -- bundles ---------------------------------------------------------------------------------------------------
def default_bundle(workdir: Path, env: dict[str, str], users: int, items: int) -> Path:
    """A small synthetic bundle, made once per work directory with the project's generator and `train`."""
    bundle = workdir / f"bundle-{users}x{items}"
    if (bundle / "manifest.json").exists():
        return bundle
    data = workdir / f"data-{users}x{items}"
    print(f"making a bundle: demo data ({users} users, {items} items) and sharefeed train ...", flush=True)
    if not data.exists():
        _sharefeed("demo-data", "--out", str(data), "--users", str(users), "--items", str(items), "--categories",
                   "10", "--days", "30", "--seed", "11", env=env)
    _sharefeed("train", "--data", str(data), "--out", str(bundle), env=env | {"SHAREFEED_HOME": str(workdir / "home")})
    return bundle


def second_version(bundle: Path, out: Path) -> tuple[Path, str]:
    """The same model under another bundle version, hard-linked (the manifest is not among the checksummed
    files): what a reload swaps in."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in bundle.iterdir():
        if path.is_file() and path.name != "manifest.json":
            os.link(path, out / path.name)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["bundle_version"] = f"{manifest['bundle_version']}-soak-reload"
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, str(manifest["bundle_version"])


# -- processes ---------------------------------------------------------------------------------------------------
class RedisServer:
    """redis-server on a fixed loopback port, without persistence: killed, it comes back empty."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        for _ in range(200):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    client.close()
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@dataclass(slots=True)
class Service:
    proc: subprocess.Popen[bytes]
    base: str
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_service(bundle: Path, workers: int, env: dict[str, str], workdir: Path) -> Service:
    port = _free_port()
    log_path = workdir / "server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(["uv", "run", "--frozen", "sharefeed", "serve", "--bundle", str(bundle), "--port",
                                 str(port), "--workers", str(workers)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Service(proc, f"http://127.0.0.1:{port}", log_path)


async def wait_ready(session: aiohttp.ClientSession, service: Service, workers: int, timeout: float) -> None:
    """/readyz answers, and every worker has loaded the bundle (one bundle_info series per worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"the service exited: {service.log_path.read_text()[-3000:]}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{service.base}/metrics") as r:
                text = await r.text()
            if len(set(re.findall(r'sharefeed_bundle_info\{pid="(\d+)"', text))) >= workers or (
                    workers == 1 and "sharefeed_bundle_info{" in text):
                return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the service was not ready after {timeout:.0f}s")


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The sum of a metric's samples whose labels contain every `k="v"` in `labels` (None: no sample)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if re.match(rf"{re.escape(name)}[{{ ]", line) and all(p in line for p in labels.split(",") if p)]
    return sum(values) if values else None


def _delta(after: str, before: str, name: str, labels: str = "") -> float:
    return (metric(after, name, labels) or 0.0) - (metric(before, name, labels) or 0.0)


async def metrics_text(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(f"{base}/metrics") as r:
        return await r.text()


# -- privacy subjects -----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Subjects:
    """Users whose opt-outs and erasures must hold after the Redis restart, and how to see them."""

    personalization_off: str = ""
    marketing_off: str = ""
    erased: list[str] = field(default_factory=list)
    viewers: dict[str, str] = field(default_factory=dict)  # erased friend -> a user whose social proof named them
    segment: Json = field(default_factory=dict)


async def _json(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kw) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def segment_members(session: aiohttp.ClientSession, base: str, definition: Json) -> set[str]:
    status, body = await _json(session, "POST", f"{base}/v1/segments/query",
                               json={"definition": definition, "page_size": 1000})
    if status != 200:
        raise RuntimeError(f"segment query -> {status}: {body}")
    return {m["user_id"] for m in body["items"]}


async def proof_names(session: aiohttp.ClientSession, base: str, user: str) -> tuple[bool, set[str]]:
    """Whether the user's feed is personalized, and every friend named in its social proof."""
    status, body = await _json(session, "GET", f"{base}/v1/users/{user}/feed", params={"n": "50", "explain": "true"})
    if status != 200:
        raise RuntimeError(f"feed of {user} -> {status}: {body}")
    named = {f for item in body["items"] for f in ((item.get("social") or {}).get("friend_ids") or [])}
    return bool(body["personalized"]), named


async def privacy_violations(session: aiohttp.ClientSession, base: str, subjects: Subjects) -> list[str]:
    """What the API shows that it should not: an empty list when every opt-out and erasure is in force."""
    found: list[str] = []
    personalized, _ = await proof_names(session, base, subjects.personalization_off)
    if personalized:
        found.append(f"{subjects.personalization_off} opted out of personalization but got a personalized feed")
    members = await segment_members(session, base, subjects.segment)
    for user in [*subjects.erased, subjects.marketing_off]:
        if user in members:
            found.append(f"{user} (erased or opted out of marketing) is in the segment {subjects.segment}")
    for friend, viewer in subjects.viewers.items():
        _, named = await proof_names(session, base, viewer)
        if friend in named:
            found.append(f"erased {friend} still named in the social proof shown to {viewer}")
    return found


async def choose_subjects(session: aiohttp.ClientSession, base: str, users: list[str]) -> Subjects:
    subjects = Subjects(segment={"kind": "social", "signal": "top_sharers", "size": 200})
    members = sorted(await segment_members(session, base, subjects.segment))
    if len(members) < 3:
        raise RuntimeError("the top sharers segment has fewer than 3 members: use a larger bundle")
    subjects.erased = members[:2]
    subjects.marketing_off = members[2]
    for user in users[:400]:  # a user shown a friend's purchase, by name: that friend is erased
        personalized, named = await proof_names(session, base, user)
        if not subjects.personalization_off and personalized:
            subjects.personalization_off = user
        candidates = sorted(named - set(subjects.erased) - {subjects.marketing_off, subjects.personalization_off})
        if candidates and not subjects.viewers:
            subjects.viewers[candidates[0]] = user
            subjects.erased.append(candidates[0])
        if subjects.viewers and subjects.personalization_off:
            break
    if not subjects.viewers or not subjects.personalization_off:
        raise RuntimeError("no feed with named social proof (or none personalized) among the first 400 users")
    for user in subjects.erased:
        status, body = await _json(session, "DELETE", f"{base}/v1/users/{user}")
        assert status == 202, body
    for user, purposes in ((subjects.personalization_off, {"personalization": False}),
                           (subjects.marketing_off, {"marketing": False})):
        status, body = await _json(session, "PUT", f"{base}/v1/users/{user}/consent", json=purposes)
        assert status == 200, body
    return subjects


# -- the load --------------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Outcome:
    kind: str  # feed | events
    scheduled: float  # seconds since the start
    status: int  # HTTP status, -1 for no answer
    latency: float
    degraded: bool = False
    version: str | None = None
    batch: list[Json] | None = None  # events: what was sent
    accepted: int = 0


async def run_load(session: aiohttp.ClientSession, base: str, args: argparse.Namespace, users: list[str],
                   items: list[str], actions: list[tuple[float, str, Any]]) -> tuple[list[Outcome], Json]:
    rng = np.random.default_rng(args.seed)
    per_second = args.rate + args.event_rate
    total = int(min(args.max_requests, per_second * args.seconds))
    kinds = np.where(rng.random(total) < args.event_rate / per_second, "events", "feed")
    outcomes: list[Outcome] = []
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    timeline: Json = {}

    def new_batch() -> list[Json]:
        stamp = datetime.now(UTC).isoformat()
        return [{"event_id": uuid.uuid4().hex, "user_id": str(rng.choice(users)), "item_id": str(rng.choice(items)),
                 "event_type": str(rng.choice(["view", "view", "view", "add_to_cart", "purchase"])),
                 "timestamp": stamp} for _ in range(args.batch)]

    async def one(kind: str, scheduled: float) -> None:
        at = scheduled - start
        try:
            if kind == "feed":
                user = str(rng.choice(users)) if rng.random() > 0.2 else f"new-{rng.integers(1_000_000)}"
                async with session.get(f"{base}/v1/users/{user}/feed", params={"n": "20"}) as r:
                    body = await r.read()
                    out = Outcome(kind, at, r.status, loop.time() - scheduled)
                    if r.status == 200:
                        doc = orjson.loads(body)
                        out.degraded, out.version = bool(doc.get("degraded")), doc.get("bundle_version")
            else:
                batch = new_batch()
                async with session.post(f"{base}/v1/events", json={"events": batch}) as r:
                    body = await r.read()
                    out = Outcome(kind, at, r.status, loop.time() - scheduled, batch=batch)
                    if r.status == 200:
                        doc = orjson.loads(body)
                        out.accepted, out.degraded = int(doc["accepted"]), not doc["online_updated"]
        except (aiohttp.ClientError, TimeoutError):
            out = Outcome(kind, at, -1, loop.time() - scheduled, batch=batch if kind == "events" else None)
        outcomes.append(out)

    async def act(at: float, name: str, run: Any) -> None:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        began = loop.time()
        result = await run()
        timeline[name] = {"at_s": round(began - start, 2), "took_s": round(loop.time() - began, 2), **(result or {})}

    side = [asyncio.create_task(act(at, name, run)) for at, name, run in actions]
    pending: set[asyncio.Task[None]] = set()
    for i in range(total):
        scheduled = start + i / per_second
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(str(kinds[i]), scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    await asyncio.gather(*side)
    timeline["load_s"] = round(loop.time() - start, 2)
    return outcomes, timeline


# -- accounting ----------------------------------------------------------------------------------------------------
def logged_events(log_dir: Path) -> tuple[Counter[str], int]:
    """Event ids in the log with how often each appears, and lines that are not whole JSON objects."""
    ids: Counter[str] = Counter()
    bad = 0
    for path in sorted((log_dir / "events").glob("*.jsonl")):
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            bad += 1
        for line in data.splitlines():
            try:
                ids[str(orjson.loads(line)["event_id"])] += 1
            except (orjson.JSONDecodeError, KeyError, TypeError):
                bad += 1
    return ids, bad


def online_state_misses(redis_url: str, acked: list[Json], erased: list[str]) -> tuple[int, int]:
    """(users checked, users whose online state lacks their newest acknowledged event); erased users' events
    are logged but never recorded, they are left out."""
    store = RedisStore(redis_url, PREFIX)
    newest: dict[str, Json] = {}
    for event in acked:
        if event["user_id"] in erased:
            continue
        if event["user_id"] not in newest or event["timestamp"] >= newest[event["user_id"]]["timestamp"]:
            newest[event["user_id"]] = event
    misses = 0
    for user, event in newest.items():
        second = int(datetime.fromisoformat(event["timestamp"]).timestamp())
        same_second = [e for e in acked if e["user_id"] == user and e["timestamp"] == event["timestamp"]]
        recent = {(e.item_id, e.event_type, int(e.ts)) for e in store.recent(user)}
        if not any((e["item_id"], e["event_type"], second) in recent for e in same_second):
            misses += 1
    store.close()
    return len(newest), misses


def trending_counts(redis_url: str, acked: list[Json], erased: list[str]) -> Json:
    """Every hourly trending counter the acknowledged events should have made, against Redis: items counted
    more (an event applied twice) or less (an event missing) than once per event."""
    expected: dict[tuple[int, str], float] = {}
    for event in acked:
        weight = DEFAULT_EVENT_WEIGHTS.get(event["event_type"], 0.0)  # what the service's store counts
        if weight > 0 and event["user_id"] not in erased:
            key = (hour_of(int(datetime.fromisoformat(event["timestamp"]).timestamp())), event["item_id"])
            expected[key] = expected.get(key, 0.0) + weight
    keys = Keys(PREFIX)
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for hour, item in expected:
        pipe.zscore(keys.trending_bucket(hour), item)
    found = [float(v or 0.0) for v in pipe.execute()]
    client.close()
    over = sum(got > want + 1e-6 for got, want in zip(found, expected.values(), strict=True))
    under = sum(got < want - 1e-6 for got, want in zip(found, expected.values(), strict=True))
    return {"counters": len(expected), "counted_more": over, "counted_less": under}


def _ms(values: list[float]) -> Json:
    if not values:
        return {"count": 0}
    p50, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 99])
    return {"count": len(values), "p50_ms": round(float(p50), 1), "p99_ms": round(float(p99), 1),
            "max_ms": round(max(values) * 1000.0, 1)}


def summarize(outcomes: list[Outcome], logged: Counter[str], torn: int, timeline: Json) -> Json:
    statuses = Counter(o.status for o in outcomes)
    failures = {str(s): n for s, n in sorted(statuses.items()) if not 200 <= s < 300}
    acked = [e for o in outcomes if o.kind == "events" and o.status == 200 for e in (o.batch or [])]
    unacked = [e for o in outcomes if o.kind == "events" and o.status != 200 for e in (o.batch or [])]
    acked_ids = [str(e["event_id"]) for e in acked]
    marks = [("before the kill", 0.0), ("Redis down", timeline["redis_killed"]["at_s"]),
             ("Redis back, until the reload", timeline["redis_restarted"]["at_s"]),
             ("reload and after", timeline["reload"]["at_s"])]
    phases = {}
    for k, (name, begin) in enumerate(marks):
        end = marks[k + 1][1] if k + 1 < len(marks) else float("inf")
        part = [o for o in outcomes if begin <= o.scheduled < end]
        phases[name] = {**_ms([o.latency for o in part]), "non_2xx": sum(not 200 <= o.status < 300 for o in part),
                        "degraded": sum(o.degraded for o in part)}
    return {
        "requests": len(outcomes),
        "by_kind": dict(Counter(o.kind for o in outcomes)),
        "non_2xx": failures,
        "failures": sum(failures.values()),
        "latency_all": _ms([o.latency for o in outcomes]),
        "latency_feed": _ms([o.latency for o in outcomes if o.kind == "feed"]),
        "latency_events": _ms([o.latency for o in outcomes if o.kind == "events"]),
        "phases": phases,
        "degraded_feeds": sum(o.degraded for o in outcomes if o.kind == "feed"),
        "events_batches_not_online": sum(o.degraded for o in outcomes if o.kind == "events"),
        "events_acknowledged": len(acked_ids),
        "acknowledged_found_once": sum(logged[i] == 1 for i in acked_ids),
        "acknowledged_lost": sum(logged[i] == 0 for i in acked_ids),
        "acknowledged_duplicated": sum(logged[i] > 1 for i in acked_ids),
        "accepted_short": sum(o.accepted != len(o.batch or []) for o in outcomes if o.kind == "events"
                              and o.status == 200),
        "unacknowledged_events": len(unacked),
        "unacknowledged_in_log": sum(logged[str(e["event_id"])] > 0 for e in unacked),
        "log_lines_torn_or_bad": torn,
        "bundle_versions": dict(Counter(o.version for o in outcomes if o.version)),
    }


# -- the run -------------------------------------------------------------------------------------------------------
async def soak(args: argparse.Namespace, work: Path, env: dict[str, str], bundle: Path) -> Json:
    reload_bundle, reload_version = second_version(bundle, work / "bundle-reload")
    users = [str(u) for u in pq.read_table(bundle / "users.parquet").column("id").to_pylist()]
    items = [str(i) for i in pq.read_table(bundle / "items.parquet").column("id").to_pylist()]
    key = _sharefeed("keys", "create", "--scope", "admin", "--name", "soak", env=env).strip().splitlines()[-1]
    server = RedisServer(args.redis_server, work)
    server.start()
    env = env | {"SHAREFEED_REDIS_URL": server.url, "SHAREFEED_REDIS_PREFIX": PREFIX,
                 "SHAREFEED_EVENT_LOG": str(work / "eventlog"), "SHAREFEED_SOCIAL_PROOF_NAMES": "true",
                 "SHAREFEED_RATE_LIMIT_PER_SECOND": "100000", "SHAREFEED_RECOVERY_POLL_SECONDS": "1",
                 "SHAREFEED_RELOAD_POLL_SECONDS": "1"}
    service = start_service(bundle, args.workers, env, work)
    results: Json = {"command": " ".join(sys.argv), "started": datetime.now(UTC).isoformat(), "bundle": str(bundle),
                     "load_average_at_start": os.getloadavg(),
                     "workers": args.workers, "rate_feed": args.rate, "rate_event_batches": args.event_rate,
                     "batch": args.batch, "seconds": args.seconds, "max_requests": args.max_requests}
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=200)
    try:
        async with aiohttp.ClientSession(connector=connector, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:
            await wait_ready(session, service, args.workers, args.ready_timeout)
            subjects = await choose_subjects(session, service.base, users)
            results["subjects"] = {"personalization_off": subjects.personalization_off,
                                   "marketing_off": subjects.marketing_off, "erased": subjects.erased}
            results["privacy_before"] = await privacy_violations(session, service.base, subjects)
            before = await metrics_text(session, service.base)
            duration = min(args.seconds, args.max_requests / (args.rate + args.event_rate))
            kill_at, back_at = duration * 0.25, duration * 0.25 + args.outage

            async def kill() -> Json:
                server.kill()
                return {}

            async def restart() -> Json:
                server.start()
                return {}

            async def reload() -> Json:
                status, body = await _json(session, "POST", f"{service.base}/v1/admin/reload",
                                           json={"bundle": str(reload_bundle)},
                                           timeout=aiohttp.ClientTimeout(total=600))
                return {"status": status, "body": body if status != 200 else {"version": body["bundle_version"]}}

            print(f"load for {duration:.0f}s: redis-server killed at {kill_at:.0f}s, restarted at {back_at:.0f}s, "
                  f"reload at {duration * 0.6:.0f}s", flush=True)
            outcomes, timeline = await run_load(session, service.base, args, users, items, [
                (kill_at, "redis_killed", kill), (back_at, "redis_restarted", restart),
                (duration * 0.6, "reload", reload)])
            results["timeline"] = timeline
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # every worker back in line (the gauge is the minimum over them)
                if metric(await metrics_text(session, service.base), "sharefeed_online_store_up") == 1:
                    break
                await asyncio.sleep(0.5)
            text = await metrics_text(session, service.base)
            results["server_metrics"] = {
                "online_store_up": metric(text, "sharefeed_online_store_up"),
                "rebuilds_during_load": _delta(text, before, "sharefeed_online_rebuilds_total"),
                "recovered_events": {how: _delta(text, before, "sharefeed_online_recovered_events_total",
                                                 f'how="{how}"') for how in ("rebuild", "backlog", "overflow")},
                "degraded": {e: metric(text, "sharefeed_degraded_total", f'endpoint="{e}"')
                             for e in ("feed", "events")},
                "reloads_loaded": metric(text, "sharefeed_reloads_total", 'outcome="loaded"'),
            }
            versions = Counter()
            for _ in range(40):  # fresh connections land on either worker
                async with session.get(f"{service.base}/readyz", headers={"connection": "close"}) as r:
                    versions[(await r.json())["bundle_version"]] += 1
            results["versions_after_reload"] = dict(versions)
            results["reload_reached_every_worker"] = set(versions) == {reload_version}
            results["privacy_after"] = await privacy_violations(session, service.base, subjects)
            acked = [e for o in outcomes if o.kind == "events" and o.status == 200 for e in (o.batch or [])]
            checked, missing = online_state_misses(server.url, acked, subjects.erased)
            results["online_state"] = {"users": checked, "missing": missing,
                                       **trending_counts(server.url, acked, subjects.erased)}
    finally:
        service.stop()
        server.kill()
    logged, torn = logged_events(work / "eventlog")
    results["summary"] = summarize(outcomes, logged, torn, timeline)
    results["finished"] = datetime.now(UTC).isoformat()
    results["load_average_at_end"] = os.getloadavg()
    return results


def report(results: Json) -> str:
    s = results["summary"]
    lines = ["| measure | value | goal |", "|---|---|---|",
             f"| requests sent (feed / event batches) | {s['requests']:,} ({s['by_kind'].get('feed', 0):,} / "
             f"{s['by_kind'].get('events', 0):,}) | |",
             f"| non-2xx answers (by status; -1: no answer) | {s['failures']} {s['non_2xx'] or ''} | 0 |",
             f"| latency p50 / p99, all requests | {s['latency_all'].get('p50_ms')} / "
             f"{s['latency_all'].get('p99_ms')} ms | |",
             f"| feed p50 / p99 | {s['latency_feed'].get('p50_ms')} / {s['latency_feed'].get('p99_ms')} ms | |",
             f"| events p50 / p99 | {s['latency_events'].get('p50_ms')} / {s['latency_events'].get('p99_ms')} ms | |",
             *(f"| {name}: requests, p50 / p99, non-2xx, degraded | {v['count']:,}, {v.get('p50_ms')} / "
               f"{v.get('p99_ms')} ms, {v['non_2xx']}, {v['degraded']} | |" for name, v in s["phases"].items()),
             f"| degraded feeds (from the bundle) / event batches logged, not yet online | {s['degraded_feeds']:,} / "
             f"{s['events_batches_not_online']:,} | |",
             f"| events acknowledged | {s['events_acknowledged']:,} | |",
             f"| acknowledged events found exactly once in the log | {s['acknowledged_found_once']:,} | all |",
             f"| acknowledged events lost / duplicated | {s['acknowledged_lost']} / {s['acknowledged_duplicated']} "
             "| 0 / 0 |",
             f"| torn or unreadable log lines | {s['log_lines_torn_or_bad']} | 0 |"]
    online = results.get("online_state") or {}
    if online:
        lines.append(f"| users whose online state lacks their newest acknowledged event (after the rebuild) | "
                     f"{online['missing']} of {online['users']} | 0 |")
        lines.append(f"| trending counters (item, hour) above / below one count per acknowledged event | "
                     f"{online['counted_more']} / {online['counted_less']} of {online['counters']:,} | 0 / 0 |")
    metrics = results.get("server_metrics", {})
    recovered = metrics.get("recovered_events") or {}
    lines += [f"| store rebuilds from the log during the load / events replayed / backlog events recorded | "
              f"{metrics.get('rebuilds_during_load'):.0f} / {recovered.get('rebuild', 0):.0f} / "
              f"{recovered.get('backlog', 0):.0f} | |",
              f"| reload reached every worker | {results.get('reload_reached_every_worker')} "
              f"({results.get('timeline', {}).get('reload', {}).get('took_s')} s) | yes |",
              "| consent and erasure violations after the Redis restart | "
              f"{len(results.get('privacy_after', []))} | 0 |"]
    return "\n".join(lines)


def goals_missed(results: Json) -> list[str]:
    s = results["summary"]
    missed = []
    if s["failures"]:
        missed.append(f"{s['failures']} non-2xx answers")
    if s["acknowledged_lost"] or s["acknowledged_duplicated"] or s["accepted_short"]:
        missed.append("acknowledged events lost, duplicated or not all accepted")
    if s["log_lines_torn_or_bad"]:
        missed.append("torn log lines")
    online = results.get("online_state") or {}
    if online.get("missing") or online.get("counted_less"):
        missed.append("online state incomplete after the restart")
    if online.get("counted_more"):
        missed.append("trending counted some events twice")
    if results.get("privacy_before") or results.get("privacy_after"):
        missed.append("consent or erasure not in force")
    if not results.get("reload_reached_every_worker"):
        missed.append("the reload did not reach every worker")
    if results.get("server_metrics", {}).get("online_store_up") != 1:
        missed.append("the online store was not back up")
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="default: a small synthetic bundle (made once)")
    parser.add_argument("--users", type=int, default=3000, help="users of the default bundle's demo data")
    parser.add_argument("--items", type=int, default=800, help="items of the default bundle's demo data")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=150.0, help="the load's length at most")
    parser.add_argument("--max-requests", type=int, default=20_000, help="the load's requests at most")
    parser.add_argument("--rate", type=float, default=20.0, help="feed requests per second")
    parser.add_argument("--event-rate", type=float, default=5.0, help="event batches per second")
    parser.add_argument("--batch", type=int, default=5, help="events per batch")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds between the kill and the restart")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "/usr/bin/redis-server")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sharefeed-soak",
                        help="bundles are kept here between runs; each run gets a fresh subdirectory")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here too")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    env = dict(os.environ) | {"SHAREFEED_KEYS_FILE": str(work / "keys.json"),
                              "SHAREFEED_SEGMENTS_DIR": str(work / "segments"),
                              "SHAREFEED_AUDIT_LOG": str(work / "audit.jsonl")}
    env.pop("SHAREFEED_REDIS_URL", None)
    bundle = args.bundle.resolve() if args.bundle else default_bundle(args.workdir, env, args.users, args.items)
    results = asyncio.run(soak(args, work, env, bundle))
    missed = goals_missed(results)
    results["goals_missed"] = missed
    results["table"] = report(results)
    text = json.dumps(results, indent=2, default=str)
    print(text)
    print()
    print(results["table"])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if missed:
        print(f"\ngoals missed: {'; '.join(missed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
