"""`sharefeed tune`: search training parameters with optuna within a time budget.

Every trial runs the full two-stage evaluation on the data **before the test cut**, split once more in
time, so the reported test window is never seen while tuning. Each trial is an MLflow run; the best
parameters are written as a YAML file that `sharefeed train --params` accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from features.dataset import load_dataset
from training import tracking
from training.bundle import ITEM_META_COLUMNS
from training.params import TrainParams
from training.settings import TrainingSettings
from training.split import time_holdout
from training.twostage import evaluate_two_stage

OBJECTIVE = "ranker.ndcg_at_20"


@dataclass(frozen=True, slots=True)
class TuneResult:
    best_value: float
    best_params: TrainParams
    trials: int
    out: Path


def _suggest(trial: Any, base: TrainParams) -> TrainParams:
    """The search space: candidate models, confidence weights per event type, the ranker."""
    weights = dict(base.weights)
    for event_type in ("view", "add_to_cart", "purchase", "share", "like"):
        weights[event_type] = trial.suggest_float(f"weight.{event_type}", 0.25, 8.0, log=True)
    return base.model_copy(
        update={
            "event_weights": weights,
            "als": base.als.model_copy(update={
                "factors": trial.suggest_categorical("als.factors", [32, 64, 128]),
                "regularization": trial.suggest_float("als.regularization", 1e-3, 10.0, log=True),
                "alpha": trial.suggest_float("als.alpha", 1.0, 40.0, log=True),
            }),
            "bpr": base.bpr.model_copy(update={
                "factors": trial.suggest_categorical("bpr.factors", [32, 64]),
                "regularization": trial.suggest_float("bpr.regularization", 1e-4, 0.1, log=True),
            }),
            "ranker": base.ranker.model_copy(update={
                "num_leaves": trial.suggest_int("ranker.num_leaves", 7, 63, log=True),
                "learning_rate": trial.suggest_float("ranker.learning_rate", 0.02, 0.2, log=True),
                "min_data_in_leaf": trial.suggest_int("ranker.min_data_in_leaf", 10, 200, log=True),
            }),
        }
    )


def tune(data_dir: Path, base: TrainParams, settings: TrainingSettings, out: Path, *, budget_seconds: float,
         max_trials: int | None = None, say: Callable[[str], None] = print) -> TuneResult:
    import optuna

    data = load_dataset(data_dir, base.weights.keys())
    holdout = time_holdout(data.events, base.split)
    if holdout.cut is None:
        raise ValueError("tuning needs time order: the data's timestamps are all equal")
    before_test = holdout.train  # the test window is never looked at while tuning
    validation = time_holdout(before_test, base.split.model_copy(update={"cut": None}))
    say(f"tuning on data before {holdout.cut.isoformat()}; validation: {validation.note}")

    def objective(trial: Any) -> float:
        params = _suggest(trial, base)
        with tracking.tracked_run(settings, run_name=f"tune {Path(data_dir).name} #{trial.number}"):
            tracking.log_params(params.flat() | {"data_dir": str(data_dir), "trial": str(trial.number)})
            tracking.set_tags({"kind": "tuning", "holdout": "validation"})
            result = evaluate_two_stage(before_test, data.items, validation, params, ITEM_META_COLUMNS,
                                        lambda _: None, social=data.social)
            metrics = result.report.flat_metrics()
            tracking.log_metrics(metrics)
        value = metrics[OBJECTIVE]
        say(f"trial {trial.number}: {OBJECTIVE} {value:.4f}")
        trial.set_user_attr("params", params.model_dump(mode="json"))
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=base.ranker.seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=max_trials, timeout=budget_seconds)
    if not study.trials or study.best_trial is None:
        raise RuntimeError("no tuning trial finished within the budget")
    best = TrainParams.model_validate(study.best_trial.user_attrs["params"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(best.model_dump(mode="json"), sort_keys=False))
    say(f"best {OBJECTIVE} {study.best_value:.4f} after {len(study.trials)} trial(s); parameters in {out}")
    return TuneResult(float(study.best_value), best, len(study.trials), out)
