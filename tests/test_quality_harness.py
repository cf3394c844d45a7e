"""benchmarks/quality.py: its splits never let a test pair into what is trained on, and one small run goes
through `sharefeed train` and `recommend` to a table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_harness", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _events(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 3000
    frame = pd.DataFrame({"user_id": [f"u{u}" for u in rng.integers(0, 120, n)],
                          "item_id": [f"i{i}" for i in rng.integers(0, 300, n)],
                          "event_type": rng.choice(["view", "purchase"], n)})
    days = rng.integers(0, 90, n)
    ts = pd.Timestamp("2025-01-01", tz="UTC") + pd.to_timedelta(days, unit="D")
    return frame.assign(timestamp=ts.strftime("%Y-%m-%dT%H:%M:%SZ"), _ts=ts)


def _pairs(frame: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(frame["user_id"], frame["item_id"], strict=True))


def test_random_split_never_lets_a_test_pair_into_training() -> None:
    quality = _harness()
    for seed in range(3):
        events = _events(seed)
        split = quality.random_split(events, seed)
        assert not _pairs(split.test) & (_pairs(split.train) | _pairs(split.valid))
        assert not _pairs(split.valid) & _pairs(split.train)
        assert len(split.train) + len(split.valid) + len(split.test) == len(events)
        shares = np.asarray([len(_pairs(p)) for p in (split.train, split.valid, split.test)]) / len(_pairs(events))
        assert abs(shares[0] - 0.8) < 0.05
        assert abs(shares[2] - 0.1) < 0.04


def test_time_split_tests_only_what_came_after_training() -> None:
    quality = _harness()
    split = quality.time_split(_events(4))
    assert split.train["_ts"].max() < split.valid["_ts"].min() <= split.valid["_ts"].max() < split.test["_ts"].min()


def test_relevant_items_are_new_pairs_and_repeat_buys_only() -> None:
    quality = _harness()
    before = pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "x"],
                           "event_type": ["purchase", "view", "purchase"]})
    after = pd.DataFrame({"user_id": ["a", "a", "a", "b"], "item_id": ["x", "y", "z", "x"],
                          "event_type": ["purchase", "purchase", "view", "view"]})
    assert quality.relevant(before, after, again={"x"}) == {"a": {"x", "z"}}
    assert quality.relevant(before, after, again=set()) == {"a": {"z"}}
    assert quality.blocked_items(before, {"x"}) == {"a": {"y"}}


def test_a_small_run_scores_sharefeed_beside_every_baseline(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(demo_dir), "--seeds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(out.read_text())
    assert set(result["cases"]) == {"random", "time"}
    for case in result["cases"].values():
        table = case["splits"][0]["table"]
        assert {"sharefeed", "popular_recent", "popular_all", "als_untuned", "als_defaults", "bm25_knn",
                "ease"} <= set(table)
        assert 0.0 < table["sharefeed"]["ndcg_at_20"] <= 1.0
        low, high = case["pooled"]["ci"]
        assert low <= case["pooled"]["ratio"] <= high
    assert "| ratio (pooled) |" in done.stdout
