"""Hostile input (issue #7): schemathesis over every operation of the service's OpenAPI document, with one
API key holding every scope, until at least `--requests` requests reached the service.

The service is the real application (`serving.app.create_app`) on a small bundle trained here from the
synthetic generator, with a real online store (a private redis-server on a free port, or
`--redis-url`; the in-process store only when neither can be had, and then it says so), its own event
log, segment folder and key file in a temporary directory. Requests go through schemathesis's in-process
ASGI transport, each with `Authorization: Bearer <key>`; without the key the fuzzer would meet only 401s.

Each operation is fuzzed in rounds, in both generation modes: positive (data the schema allows) and
negative (data it refuses: every such request must get a 4xx). Positive cases are sent in three forms:
- half get realistic values where random text would only ever find a 404 ("realistic"): path parameters
  (user, item, segment, saved-segment and rule ids seen in the bundle or created earlier in the run), a
  valid event inserted into event batches, known ids in rank, rule and segment bodies, the served bundle's
  path for a reload;
- a quarter get one to three values swapped for hostile ones of the same JSON type, which random generation
  rarely reaches ("hostile"): text that is very long, empty, NUL, zero-width, right-to-left,
  a lone UTF-16 surrogate (sent as a JSON escape), a path, a far-future or far-past time; numbers
  such as 1e308, 5e-324, 2**64 and 10**400;
- the rest as generated.

Warnings raised in the product's code are errors here, as in the test suite (a numeric overflow is a bug
even where it only warns), so they surface as 500s.

Every request and its status code is counted per operation. A 5xx is recorded with its operation, the
exception behind it (the innermost frame of the product's code) and a short curl reproduction; so is a
response that started and then broke off (an exception after the status line was sent, e.g. in a streamed
export). The run prints a JSON summary and a markdown table and exits 1 on any such failure.

    uv run python benchmarks/fuzz.py --requests 10000 --out /tmp/fuzz.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException
from schemathesis import GenerationMode
from schemathesis.python import asgi

from serving.app import create_app
from serving.auth import Scope, create_key
from serving.settings import ServingSettings
from training.bundle import Bundle, load_bundle

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = tuple(str(ROOT / package) for package in ("features", "serving", "training", "sharefeed"))
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
REALISTIC_BELOW, HOSTILE_BELOW = 50, 75  # rolls (0-99) of positive cases: realistic ids, then hostile values
HOSTILE_TEXT = ("", " ", "\x00", "a\x00b", "x" * 5000, "\u202e\u05d0\u05d1\u0627", "\u200b", "\ufeff", "\ud800",
                "a\udfffb", "\U0001f642" * 300, "../../etc/passwd", "nan", "Infinity", "1e400", "9" * 400, "-0",
                "0001-01-01T00:00:00Z", "9999-12-31T23:59:59+14:00", "+275760-09-13T00:00:00Z", "\u2028\n\r",
                "null", "[]", "{}")
HOSTILE_NUMBERS = (0, -1, 1e308, -1e308, 5e-324, 1.7976931348623157e308, 2**64, -(2**63) - 1, 10**400)
REDIS_SERVER = "/usr/bin/redis-server"

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


# -- what a run found ------------------------------------------------------------------------------------------

@dataclass
class ServerError:
    operation: str
    status: int  # 5xx; or the status already sent when the response broke off afterwards
    error: str  # exception type, message and where in the product it was raised
    reproduction: str
    count: int = 1


@dataclass
class FuzzReport:
    by_operation: dict[str, Counter[int]] = field(default_factory=dict)
    by_mode: dict[str, Counter[int]] = field(default_factory=dict)
    errors: dict[tuple[str, str], ServerError] = field(default_factory=dict)
    not_sent: Counter[str] = field(default_factory=Counter)  # cases the HTTP client refused to send, by reason
    negative_accepted: dict[str, tuple[int, str]] = field(default_factory=dict)  # operation -> (count, first case)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(sum(codes.values()) for codes in self.by_operation.values())

    @property
    def status_mix(self) -> Counter[int]:
        total: Counter[int] = Counter()
        for codes in self.by_operation.values():
            total.update(codes)
        return total

    @property
    def server_errors(self) -> int:
        return sum(error.count for error in self.errors.values())

    def count(self, operation: str, mode: str, status: int) -> None:
        self.by_operation.setdefault(operation, Counter())[status] += 1
        self.by_mode.setdefault(mode, Counter())[status] += 1

    def fail(self, operation: str, status: int, error: str, reproduction: str) -> None:
        key = (operation, error)
        if key in self.errors:
            self.errors[key].count += 1
        else:
            self.errors[key] = ServerError(operation, status, error, reproduction)

    def summary(self) -> dict[str, Any]:
        def codes(counter: Counter[int]) -> dict[str, int]:
            return {str(code): n for code, n in sorted(counter.items())}

        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 1),
            "status_mix": codes(self.status_mix),
            "status_classes": _classes(self.status_mix),
            "by_mode": {mode: codes(counter) for mode, counter in self.by_mode.items()},
            "server_errors": self.server_errors,
            "errors": [vars(e) for e in self.errors.values()],
            "not_sent": dict(self.not_sent),
            "negative_accepted": {op: {"count": n, "first": case} for op, (n, case) in
                                  sorted(self.negative_accepted.items())},
            "by_operation": {op: codes(counter) for op, counter in sorted(self.by_operation.items())},
        }

    def markdown(self) -> str:
        lines = ["| operation | requests | 2xx | 4xx | 5xx | status codes |", "|---|---:|---:|---:|---:|---|"]
        for operation, counter in sorted(self.by_operation.items(), key=lambda kv: kv[0].split(" ", 1)[::-1]):
            classes = _classes(counter)
            mix = ", ".join(f"{code}: {n}" for code, n in sorted(counter.items()))
            lines.append(f"| `{operation}` | {sum(counter.values()):,} | {classes['2xx']:,} | {classes['4xx']:,} "
                         f"| {classes['5xx']:,} | {mix} |")
        total = self.status_mix
        classes = _classes(total)
        lines.append(f"| **all {len(self.by_operation)} operations** | **{self.requests:,}** | **{classes['2xx']:,}** "
                     f"| **{classes['4xx']:,}** | **{classes['5xx']:,}** | "
                     f"{', '.join(f'{c}: {n:,}' for c, n in sorted(total.items()))} |")
        return "\n".join(lines)


def _classes(counter: Counter[int]) -> dict[str, int]:
    out = {f"{k}xx": 0 for k in (2, 3, 4, 5)}
    for code, n in counter.items():
        out[f"{code // 100}xx"] = out.get(f"{code // 100}xx", 0) + n
    return out


# -- the application under test ----------------------------------------------------------------------------------

class Witness:
    """Outermost ASGI layer: remembers the exception behind a 500 (Starlette answers 500, then re-raises)
    and whether the response had started, and swallows it so the client sees what a real server sends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.error: BaseException | None = None
        self.started_status: int | None = None
        self.reached = False

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.reached, self.error, self.started_status = True, None, None

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.started_status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            self.error = exc
            if self.started_status is None:  # nothing was answered at all: answer as a server would
                await send({"type": "http.response.start", "status": 500, "headers": []})
                await send({"type": "http.response.body", "body": b""})


@dataclass
class Pools:
    """Realistic values for ids: from the bundle, and what the run itself created."""

    users: list[str]
    items: list[str]
    categories: list[str]
    bundle_path: str
    segments: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Pools:
        categories = sorted({str(c) for c in bundle.item_meta["category"].dropna().unique()})
        return cls(users=[str(u) for u in bundle.users.ids], items=[str(i) for i in bundle.items.ids],
                   categories=categories, bundle_path=str(bundle.path))

    def remember(self, pool: list[str], value: object) -> None:
        if isinstance(value, str) and value not in pool:
            pool.append(value)
            del pool[:-50]  # the newest 50


def full_scope_key(keys_file: Path) -> str:
    """A new key holding every scope (feed:read events:write segments:read admin)."""
    return create_key(keys_file, list(Scope), "fuzz: every scope")[1]


def service_settings(workdir: Path, keys_file: Path, redis_url: str | None) -> ServingSettings:
    return ServingSettings(
        keys_file=keys_file, event_log=workdir / "eventlog", segments_dir=workdir / "segments",
        audit_log=workdir / "audit.jsonl", redis_url=redis_url, redis_prefix=f"fuzz:{uuid.uuid4().hex[:8]}:",
        rate_limit_per_second=0,
    )


# -- realistic values --------------------------------------------------------------------------------------------

def _realistic(case: Any, pools: Pools, rng: random.Random) -> None:
    """Put known ids where the operation would otherwise only meet unknown ones (positive cases only)."""
    path = case.operation.path
    method = case.method.upper()
    params = case.path_parameters or {}
    choices = {"user_id": pools.users, "item_id": pools.items, "segment_id": pools.segments, "name": pools.saved,
               "rule_id": pools.rules}
    for name, pool in choices.items():
        if name in params and pool:
            params[name] = rng.choice(pool)
    if case.query and "category" in case.query and pools.categories:
        case.query["category"] = rng.choice(pools.categories)
    body = case.body
    if not isinstance(body, dict):
        return
    if (method, path) == ("POST", "/v1/events") and isinstance(body.get("events"), list):
        now = datetime.now(UTC).isoformat()
        kind = rng.choice(["view", "add_to_cart", "purchase", "share", "like"])
        body["events"].insert(rng.randrange(len(body["events"]) + 1), {
            "user_id": rng.choice(pools.users), "item_id": rng.choice(pools.items), "event_type": kind,
            "timestamp": now, "quantity": 1, "price": 9.5})
    elif (method, path) == ("POST", "/v1/rank"):
        body["user_id"] = rng.choice(pools.users)
        body["item_ids"] = rng.sample(pools.items, min(len(pools.items), rng.randint(1, 30)))
    elif (method, path) == ("POST", "/v1/admin/reload") and rng.random() < 0.5:
        body["bundle"] = pools.bundle_path
    elif method == "PUT" and path == "/v1/merchandising/rules/{rule_id}":
        if body.get("item_ids"):
            body["item_ids"] = rng.sample(pools.items, min(len(body["item_ids"]), len(pools.items)))
        if body.get("categories"):
            body["categories"] = [rng.choice(pools.categories)]
    definition = body.get("definition") if path == "/v1/segments/query" else body if "kind" in body else None
    if isinstance(definition, dict):
        _realistic_definition(definition, pools, rng)


def _realistic_definition(definition: dict[str, Any], pools: Pools, rng: random.Random) -> None:
    for name, pool in (("item_id", pools.items), ("user_id", pools.users), ("category", pools.categories),
                       ("seed_segment_id", pools.segments)):
        if definition.get(name) is not None and pool:
            definition[name] = rng.choice(pool)
    if definition.get("seed_user_ids"):
        definition["seed_user_ids"] = rng.sample(pools.users, min(len(pools.users), rng.randint(1, 20)))
    if isinstance(definition.get("size"), int):
        definition["size"] = min(definition["size"], 500)  # keep snapshots small: the run makes many


def _hostile(case: Any, rng: random.Random) -> None:
    """Swap one to three values of the case (path, query or body leaves) for hostile ones of the same kind."""
    slots: list[tuple[Any, Any, Any]] = []  # (container, key, current value)
    for container in (case.path_parameters, case.query):
        if container:
            slots += [(container, key, value) for key, value in container.items()]
    stack = [case.body] if isinstance(case.body, dict | list) else []
    while stack:
        node = stack.pop()
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, dict | list):
                stack.append(value)
            else:
                slots.append((node, key, value))
    for container, key, value in rng.sample(slots, min(len(slots), rng.randint(1, 3))):
        in_url = container is case.path_parameters or container is case.query
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            container[key] = rng.choice(HOSTILE_NUMBERS)
            if in_url:
                container[key] = str(container[key])
        elif isinstance(value, str):
            text = rng.choice(HOSTILE_TEXT)
            if in_url:  # a URL carries UTF-8 only: no lone surrogates there
                text = text.encode("utf-8", "replace").decode("utf-8")
                text = quote(text, safe="") if container is case.path_parameters else text
            container[key] = text


def _learn(operation: str, status: int, payload: Any, case: Any, pools: Pools) -> None:
    """Remember ids the service created, so later cases can reach them."""
    if status != 200 or not isinstance(payload, dict):
        return
    if operation in ("POST /v1/segments/query", "POST /v1/segments/saved/{name}/run"):
        pools.remember(pools.segments, payload.get("segment_id"))
    elif operation == "PUT /v1/segments/saved/{name}":
        pools.remember(pools.saved, payload.get("name"))
    elif operation == "PUT /v1/merchandising/rules/{rule_id}":
        rule = payload.get("rule")
        pools.remember(pools.rules, rule.get("id") if isinstance(rule, dict) else None)
    elif operation == "DELETE /v1/merchandising/rules/{rule_id}" and payload.get("rule_id") in pools.rules:
        pools.rules.remove(payload["rule_id"])


# -- the fuzzing loop --------------------------------------------------------------------------------------------

def _short(frame: traceback.FrameSummary) -> str:
    name = frame.filename
    name = str(Path(name).relative_to(ROOT)) if name.startswith(str(ROOT) + "/") and "/.venv/" not in name \
        else name.rsplit("site-packages/", 1)[-1]
    return f"{name}:{frame.lineno}"


def _where(exc: BaseException) -> str:
    """`Type: message at file:line`: the innermost frame of the product's code, and the one that raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(PRODUCT)]
    place = f" at {_short(ours[-1])}" if ours else ""
    if frames and (not ours or frames[-1] is not ours[-1]):
        place += f" (raised in {_short(frames[-1])})"
    return f"{type(exc).__name__}: {str(exc)[:160]}{place}"


def _reproduction(case: Any) -> str:
    try:
        command = case.as_curl_command(headers={"Authorization": "Bearer $KEY"})
    except Exception as exc:  # the curl rendering can fail on the very input that broke the service
        command = f"{case.method} {case.formatted_path} ({type(exc).__name__} rendering curl)"
    first = command.splitlines()[0] if command else ""
    return first if len(first) <= 600 else first[:600] + " ...(cut)"


@dataclass
class Fuzzer:
    app: Witness
    key: str
    pools: Pools
    report: FuzzReport = field(default_factory=FuzzReport)
    seed: int = 0

    def send(self, case: Any, mode: GenerationMode, roll: int, session: asgi.ASGIClient) -> None:
        operation = f"{case.method.upper()} {case.operation.path}"
        label = mode.value
        rng = random.Random(self.report.requests * 7919 + roll)
        if mode is GenerationMode.POSITIVE and roll < REALISTIC_BELOW:
            label = "realistic"
            _realistic(case, self.pools, rng)
        elif mode is GenerationMode.POSITIVE and roll < HOSTILE_BELOW:
            label = "hostile"
            _hostile(case, rng)
        self.app.reached = False
        try:
            response = case.call(session=session, headers={"Authorization": f"Bearer {self.key}"})
        except Exception as exc:
            if not self.app.reached:  # the client refused to send it (a header it cannot encode, ...)
                self.report.not_sent[type(exc).__name__] += 1
                return
            status = self.app.started_status or 0  # the service answered something the client cannot read
            self.report.count(operation, label, status)
            self.report.fail(operation, status, f"unreadable response: {_where(exc)}", _reproduction(case))
            return
        status = response.status_code
        self.report.count(operation, label, status)
        if mode is GenerationMode.NEGATIVE and 200 <= status < 300:  # schema-invalid input that was taken
            count, first = self.report.negative_accepted.get(operation, (0, _reproduction(case)))
            self.report.negative_accepted[operation] = (count + 1, first)
        error = self.app.error
        if status >= 500 or error is not None:
            detail = _where(error) if error is not None else response.text[:200]
            if error is not None and status < 500:
                detail = f"response broke off after {status}: {detail}"
            self.report.fail(operation, status, detail, _reproduction(case))
            return
        if status == 200 and any("json" in value for value in response.headers.get("content-type", [])):
            try:
                payload = response.json()
            except ValueError:
                payload = None
            _learn(operation, status, payload, case, self.pools)

    def round(self, operations: list[Any], examples: int, number: int, session: asgi.ASGIClient) -> None:
        """Up to `examples` cases of each operation in each mode, each (operation, mode, round) its own seed."""
        for k, operation in enumerate(operations):
            for mode in MODES:
                seed = self.seed * 1_000_003 + number * 1009 + k * 2 + (mode is GenerationMode.NEGATIVE)
                self._cases(operation, mode, examples, seed, session)

    def _cases(self, operation: Any, mode: GenerationMode, examples: int, seed: int, session: asgi.ASGIClient) -> None:
        strategy = operation.as_strategy(generation_mode=mode)

        @hypothesis.seed(seed)
        @hypothesis.settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                    HealthCheck.data_too_large, HealthCheck.large_base_example],
                             verbosity=hypothesis.Verbosity.quiet)
        @hypothesis.given(case=strategy, roll=st.integers(min_value=0, max_value=99))
        def run(case: Any, roll: int) -> None:
            self.send(case, mode, roll, session)

        try:
            run()
        except HypothesisException as exc:  # e.g. no negative case exists for an operation without inputs
            self.report.not_sent[f"{operation.method.upper()} {operation.path} {mode.value}: {type(exc).__name__}"] += 1


def fuzz(app: Any, key: str, pools: Pools, *, requests: int, seed: int = 0, examples: int = 60,
         say: Callable[[str], None] = print) -> FuzzReport:
    """Fuzz every operation of `app`'s /openapi.json, in rounds, until `requests` requests were answered."""
    witness = Witness(app)
    fuzzer = Fuzzer(witness, key, pools, seed=seed)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module=r"(features|serving|training)(\.|$)")
        _rounds(fuzzer, requests, examples, started, say)
    fuzzer.report.seconds = time.perf_counter() - started
    return fuzzer.report


def _rounds(fuzzer: Fuzzer, requests: int, examples: int, started: float, say: Callable[[str], None]) -> None:
    witness = fuzzer.app
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", witness)
        operations = [result.ok() for result in schema.get_all_operations()]
        with asgi.get_client(witness) as session:
            number = 0
            while fuzzer.report.requests < requests:
                before = fuzzer.report.requests
                fuzzer.round(operations, examples, number, session)
                say(f"round {number}: {fuzzer.report.requests:,} requests, {fuzzer.report.server_errors} 5xx "
                    f"({time.perf_counter() - started:.0f}s)")
                if fuzzer.report.requests == before:
                    raise RuntimeError("a whole round sent no request: nothing to fuzz")
                number += 1
    finally:
        asgi.shutdown_lifespans()


# -- set-up for a stand-alone run ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_redis(workdir: Path) -> Iterator[str | None]:
    """A redis-server on a free port (no persistence) for the run; None when there is no binary."""
    import redis

    binary = REDIS_SERVER if os.path.exists(REDIS_SERVER) else shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                                "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(url, socket_connect_timeout=0.2) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the private redis-server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def build_bundle(workdir: Path, users: int, items: int) -> Path:
    """`sharefeed demo-data` + `train` on tiny data: the same library calls, MLflow in the work folder."""
    from features.synthetic import DemoDataConfig, generate_demo_data
    from training.params import ALSParams, TrainParams
    from training.pipeline import train
    from training.settings import TrainingSettings

    data, out = workdir / "data", workdir / "bundle"
    generate_demo_data(data, DemoDataConfig(users=users, items=items, categories=6, days=21, seed=11))
    params = TrainParams(als=ALSParams(factors=16, iterations=6, regularization=0.1, alpha=10.0))
    train(data, out, params, TrainingSettings(home=workdir / "home", mlflow_uri=None, now=None), say=lambda _: None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="answered requests to reach at least")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=60, help="cases per operation, mode and round")
    parser.add_argument("--bundle", type=Path, help="serve this bundle instead of training a tiny one")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("--redis-url", default=os.environ.get("SHAREFEED_REDIS_URL"),
                        help="an online store to use (default: a private redis-server)")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="sharefeed-fuzz-") as folder:
        workdir = Path(folder)
        started = time.perf_counter()
        bundle_path = args.bundle or build_bundle(workdir, args.users, args.items)
        data = (f"bundle {args.bundle}" if args.bundle else
                f"tiny bundle trained here: demo-data --users {args.users} --items {args.items} --categories 6 "
                f"--days 21 --seed 11, ALS 16 factors")
        print(f"bundle ready in {time.perf_counter() - started:.0f}s: {bundle_path}", file=sys.stderr)
        bundle = load_bundle(bundle_path)
        with _store_url(args.redis_url, workdir) as (redis_url, store_note):
            keys_file = workdir / "keys.json"
            key = full_scope_key(keys_file)
            app = create_app(service_settings(workdir, keys_file, redis_url), bundle=bundle)
            report = fuzz(app, key, Pools.from_bundle(bundle), requests=args.requests, seed=args.seed,
                          examples=args.examples, say=lambda line: print(line, file=sys.stderr))
    summary = {"command": " ".join(["benchmarks/fuzz.py", *(argv if argv is not None else sys.argv[1:])]),
               "date": datetime.now(UTC).strftime("%Y-%m-%d"), "schemathesis": schemathesis.__version__,
               "hypothesis": hypothesis.__version__, "key_scopes": [s.value for s in Scope], "data": data,
               "online_store": store_note, **report.summary()}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print()
    print(report.markdown())
    for error in report.errors.values():
        print(f"\n5xx x{error.count} on {error.operation} ({error.status}): {error.error}\n    {error.reproduction}")
    return 1 if report.server_errors else 0


@contextmanager
def _store_url(configured: str | None, workdir: Path) -> Iterator[tuple[str | None, str]]:
    if configured:
        yield configured, f"Redis at {configured}"
        return
    with private_redis(workdir) as url:
        if url is None:
            print("note: no redis-server binary and no --redis-url: using the in-process store", file=sys.stderr)
            yield None, "in-process store (no redis-server found)"
        else:
            yield url, "private redis-server on a free port (no persistence)"


if __name__ == "__main__":
    sys.exit(main())
