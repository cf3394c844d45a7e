"""The fuzzing of benchmarks/fuzz.py on a small budget: every operation of the OpenAPI document, positive,
realistic, hostile and negative cases, a key holding every scope, a real Redis; no 5xx, and the key was
really accepted (each family of operations answered 2xx, none answered 401 or 403)."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

from fastapi.testclient import TestClient

from serving.app import create_app
from training.bundle import load_bundle
from training.pipeline import TrainResult

pytest_plugins = ["tests.redis_fixture"]

BUDGET = 300


def _fuzz_module() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("sharefeed_benchmarks_fuzz", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fuzz = _fuzz_module()


def _family(operation: str) -> str:
    """`GET /v1/users/{user_id}/feed` -> `users`; `GET /healthz` -> `healthz`."""
    parts = operation.split(" ", 1)[1].strip("/").split("/")
    return parts[1] if parts[0] == "v1" else parts[0]


def test_fuzzing_every_operation_with_a_full_scope_key_finds_no_5xx(trained: TrainResult, redis_url: str,
                                                                    tmp_path: Path) -> None:
    bundle = load_bundle(trained.bundle_path)
    keys_file = tmp_path / "fuzz-keys.json"
    key = fuzz.full_scope_key(keys_file)
    app = create_app(fuzz.service_settings(tmp_path, keys_file, redis_url), bundle=bundle)
    with TestClient(app) as client:
        operations = {f"{method.upper()} {path}" for path, item in client.get("/openapi.json").json()["paths"].items()
                      for method in item}

    report = fuzz.fuzz(app, key, fuzz.Pools.from_bundle(bundle), requests=BUDGET, examples=7, seed=7,
                       say=lambda _: None)

    assert report.requests >= BUDGET
    assert report.server_errors == 0, "\n".join(f"{e.operation}: {e.error}\n  {e.reproduction}"
                                                for e in report.errors.values())
    assert set(report.by_operation) == operations  # every operation was fuzzed
    mix = report.status_mix
    assert mix[401] == mix[403] == 0, mix  # the key holds every scope: it is never refused
    answered: Counter[str] = Counter()
    for operation, codes in report.by_operation.items():
        answered[_family(operation)] += sum(n for code, n in codes.items() if 200 <= code < 300)
    families = {_family(operation) for operation in operations}
    assert {f for f in families if answered[f] == 0} == set(), answered
    assert len(families) >= 9
    assert {"realistic", "hostile", "positive", "negative"} <= set(report.by_mode)
    assert sum(report.by_mode["negative"].values()) > BUDGET // 4
