"""Shared fixtures: a small trained bundle built once per session from the synthetic generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.synthetic import DemoDataConfig, generate_demo_data
from training.params import ALSParams, PropensityParams, SplitParams, TrainParams
from training.pipeline import TrainResult, train
from training.settings import TrainingSettings

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_ALS = ALSParams(factors=16, iterations=6, regularization=0.1, alpha=10.0)
TINY_PROPENSITY = PropensityParams(min_positives=2)  # the tiny validation window has few buyers per target
TIME = SplitParams(protocol="time")  # the tiny set has too few test users for auto to pick time


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_data(out, DemoDataConfig(users=400, items=200, categories=6, days=21, seed=3))
    return out


@pytest.fixture(scope="session")
def training_settings(tmp_path_factory: pytest.TempPathFactory) -> TrainingSettings:
    return TrainingSettings(home=tmp_path_factory.mktemp("home"), mlflow_uri=None, now=None)


@pytest.fixture(scope="session")
def trained(demo_dir: Path, training_settings: TrainingSettings,
            tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("bundles") / "demo"
    # the ranker pinned: most serving tests exercise its path (tests/test_selection.py trains an unpinned one)
    return train(demo_dir, out, TrainParams(als=TINY_ALS, propensity=TINY_PROPENSITY, split=TIME, serve="ranker"),
                 training_settings, say=lambda _: None)


@pytest.fixture(autouse=True)
def _private_event_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service started by a test keeps its event log, segments and keys in the test's own folder, never in
    the home."""
    monkeypatch.setenv("SHAREFEED_EVENT_LOG", str(tmp_path / "eventlog"))
    monkeypatch.setenv("SHAREFEED_SEGMENTS_DIR", str(tmp_path / "segments"))
    monkeypatch.setenv("SHAREFEED_KEYS_FILE", str(tmp_path / "keys.json"))
    monkeypatch.setenv("SHAREFEED_AUDIT_LOG", str(tmp_path / "audit.jsonl"))  # none: open unless a test adds keys
