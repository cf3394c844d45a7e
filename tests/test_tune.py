"""Tuning: trials are tracked runs on a validation window, and the best parameters feed `train`."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from sharefeed.cli import main
from training.params import ALSParams, BPRParams, TrainParams, load_params
from training.settings import TrainingSettings
from training.tune import OBJECTIVE, tune

FAST = TrainParams(als=ALSParams(factors=8, iterations=3), bpr=BPRParams(factors=8, iterations=5))


def test_tune_tracks_each_trial_and_writes_parameters_train_accepts(
    demo_dir: Path, tmp_path: Path, training_settings: TrainingSettings
) -> None:
    out = tmp_path / "best.yaml"
    result = tune(demo_dir, FAST, training_settings, out, budget_seconds=300, max_trials=2, say=lambda _: None)
    assert result.trials == 2
    best = load_params(out)
    assert best == result.best_params
    assert best.als.factors in (32, 64, 128)
    client = mlflow.MlflowClient(tracking_uri=training_settings.tracking_uri)
    experiment = client.get_experiment_by_name(training_settings.mlflow_experiment)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'tuning'")
    assert len(runs) >= 2
    assert max(r.data.metrics[OBJECTIVE] for r in runs) == pytest.approx(result.best_value)


def test_tuning_never_reads_the_test_window(demo_dir: Path, tmp_path: Path,
                                            training_settings: TrainingSettings) -> None:
    """Scrambling every event of the test window leaves the tuning score unchanged."""
    events = pd.read_parquet(demo_dir / "events.parquet")
    first = tune(demo_dir, FAST, training_settings, tmp_path / "a.yaml", budget_seconds=300, max_trials=1,
                 say=lambda _: None)
    from features.dataset import load_dataset
    from training.split import time_holdout

    cut = time_holdout(load_dataset(demo_dir, FAST.weights.keys()).events, FAST.split).cut
    assert cut is not None
    scrambled = tmp_path / "scrambled"
    scrambled.mkdir()
    test = events["timestamp"] >= cut
    events.loc[test, "item_id"] = events.loc[test, "item_id"].sample(frac=1.0, random_state=1).to_numpy()
    events.to_parquet(scrambled / "events.parquet")
    for table in ("items", "users", "social"):
        (scrambled / f"{table}.parquet").write_bytes((demo_dir / f"{table}.parquet").read_bytes())
    second = tune(scrambled, FAST, training_settings, tmp_path / "b.yaml", budget_seconds=300, max_trials=1,
                  say=lambda _: None)
    assert second.best_value == pytest.approx(first.best_value)


def test_tune_command(demo_dir: Path, tmp_path: Path, training_settings: TrainingSettings,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHAREFEED_HOME", str(training_settings.home))
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(FAST.model_dump(mode="json")))
    out = tmp_path / "tuned.yaml"
    result = CliRunner().invoke(main, ["tune", "--data", str(demo_dir), "--out", str(out), "--trials", "1",
                                       "--params", str(base)])
    assert result.exit_code == 0, result.output
    assert "best ranker.ndcg_at_20" in result.output
    assert load_params(out).als.iterations == 3  # untuned fields keep the starting parameters
