"""The second stage: LightGBM over the candidate union, one query group per user (LambdaRank by default).

Groups without a positive label are dropped (they would score a perfect NDCG and inflate validation),
rows of a group stay contiguous, and the feature order is pinned by `features.ranking.FEATURE_NAMES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np

from features.ranking import FEATURE_NAMES
from training.params import RankerParams


@dataclass(frozen=True, slots=True)
class RankerData:
    features: np.ndarray
    labels: np.ndarray
    group_sizes: np.ndarray


def with_positive_groups(
    features: np.ndarray, labels: np.ndarray, group_sizes: np.ndarray, keep_groups: np.ndarray | None = None
) -> RankerData:
    """Only groups holding at least one positive label (and, if given, only `keep_groups`)."""
    ends = np.cumsum(group_sizes)
    starts = ends - group_sizes
    chosen = [
        g
        for g in range(len(group_sizes))
        if group_sizes[g] and labels[starts[g] : ends[g]].max() > 0 and (keep_groups is None or keep_groups[g])
    ]
    if not chosen:
        return RankerData(np.empty((0, features.shape[1]), np.float32), np.empty(0, np.int32), np.empty(0, np.int64))
    index = np.concatenate([np.arange(starts[g], ends[g]) for g in chosen])
    return RankerData(features[index], labels[index], group_sizes[chosen])


def shuffled_within_groups(data: RankerData, seed: int) -> RankerData:
    """The same groups with their rows in random order (deterministic per seed).

    Candidate rows arrive in merge order, which is already a good ranking; LightGBM's NDCG keeps row order
    among tied scores, so in the first rounds, when most scores tie, early stopping would credit the model
    with the merge order and stop after a handful of trees.
    """
    rng = np.random.default_rng(seed)
    ends = np.cumsum(data.group_sizes)
    order = np.concatenate(
        [start + rng.permutation(size) for start, size in zip((ends - data.group_sizes).tolist(),
                                                              data.group_sizes.tolist(), strict=True)]
    ) if len(data.group_sizes) else np.empty(0, dtype=np.int64)
    return RankerData(data.features[order], data.labels[order], data.group_sizes)


def sample_negatives(data: RankerData, per_group: int, rng: np.random.Generator) -> RankerData:
    """Every positive and at most `per_group` random negatives of each group, order kept."""
    keep: list[np.ndarray] = []
    sizes: list[int] = []
    start = 0
    for size in data.group_sizes.tolist():
        labels = data.labels[start : start + size]
        positives = np.flatnonzero(labels > 0)
        negatives = np.flatnonzero(labels == 0)
        if len(negatives) > per_group:
            negatives = rng.choice(negatives, per_group, replace=False)
        rows = np.sort(np.concatenate([positives, negatives])) + start
        keep.append(rows)
        sizes.append(len(rows))
        start += size
    index = np.concatenate(keep) if keep else np.empty(0, dtype=np.int64)
    return RankerData(data.features[index], data.labels[index], np.asarray(sizes, dtype=np.int64))


@dataclass(frozen=True, slots=True)
class Ranker:
    booster: lgb.Booster
    rounds: int

    def predict(self, features: np.ndarray) -> np.ndarray:
        if not len(features):
            return np.empty(0, dtype=np.float64)
        return np.asarray(self.booster.predict(features, num_iteration=self.rounds, num_threads=1))

    def to_string(self) -> str:
        return str(self.booster.model_to_string(num_iteration=self.rounds))

    @classmethod
    def from_string(cls, text: str) -> Ranker:
        booster = lgb.Booster(model_str=text)
        if tuple(booster.feature_name()) != FEATURE_NAMES:
            raise ValueError("the ranker's feature names differ from this version's FEATURE_NAMES")
        return cls(booster, booster.current_iteration())


def fit_ranker(
    train: RankerData,
    params: RankerParams,
    valid: RankerData | None = None,
    rounds: int | None = None,
    feature_names: tuple[str, ...] = FEATURE_NAMES,
    settings: Mapping[str, Any] | None = None,
) -> Ranker:
    """`params.objective`; early stopping on `valid` NDCG@20 unless a fixed number of `rounds` is given.

    The binary objective learns "bought or carted" (label > 0); early stopping still reads the graded labels.
    `feature_names` names the columns and `settings` adds LightGBM settings over the ones built here; only
    benchmarks pass anything but the defaults.
    """
    lgb_settings: dict[str, Any] = {
        "objective": params.objective,
        "metric": "ndcg",
        "ndcg_eval_at": [20],
        "num_leaves": params.num_leaves,
        "learning_rate": params.learning_rate,
        "min_data_in_leaf": params.min_data_in_leaf,
        "feature_fraction": params.feature_fraction,
        "bagging_fraction": params.bagging_fraction,
        "bagging_freq": 1,
        "lambda_l2": params.lambda_l2,
        "seed": params.seed,
        "num_threads": 2,
        "verbosity": -1,
        "deterministic": True,
        "force_row_wise": True,
        **(settings or {}),
    }
    train_set = _dataset(train, params, feature_names)
    callbacks: list[Callable[..., Any]] = []
    valid_sets = []
    if rounds is None and params.stopping_folds >= 2:
        rounds = rounds_by_folds(train, params, lgb_settings, feature_names)
    elif valid is not None and rounds is None and len(valid.group_sizes):
        valid = shuffled_within_groups(valid, params.seed)
        valid_sets = [lgb.Dataset(valid.features, valid.labels, group=valid.group_sizes, reference=train_set)]
        callbacks.append(lgb.early_stopping(params.early_stopping_rounds, verbose=False))
    booster = lgb.train(
        lgb_settings, train_set, num_boost_round=rounds or params.max_rounds, valid_sets=valid_sets, callbacks=callbacks
    )
    best = booster.best_iteration if booster.best_iteration > 0 else booster.current_iteration()
    return Ranker(booster, best)


def _dataset(data: RankerData, params: RankerParams, feature_names: tuple[str, ...]) -> lgb.Dataset:
    """LightGBM's view of the groups; the binary objective learns "bought or carted" (label > 0)."""
    labels = (data.labels > 0).astype(np.int32) if params.objective == "binary" else data.labels
    return lgb.Dataset(
        data.features, labels, group=data.group_sizes, feature_name=list(feature_names), free_raw_data=False
    )


def rounds_by_folds(
    train: RankerData, params: RankerParams, lgb_settings: Mapping[str, Any], feature_names: tuple[str, ...]
) -> int:
    """The round count with the best mean NDCG@20 over `params.stopping_folds` folds of the training groups.

    With a hundred validation users the NDCG@20 curve is noisy enough that early stopping on it picks 5 rounds
    at one seed and 80 at the next; the mean over folds of every training group is steadier. The folds split
    whole groups, rows are shuffled within groups first (see `shuffled_within_groups`), and at least as many
    groups as folds are needed. Under the binary objective the folds' NDCG reads the 0/1 labels the trees learn
    (one LightGBM data set serves both), not the graded ones holdout early stopping reads.
    """
    folds = params.stopping_folds
    if len(train.group_sizes) < folds:
        raise ValueError(f"{len(train.group_sizes)} training groups cannot be split into {folds} folds")
    data = shuffled_within_groups(train, params.seed)
    # The binary objective has no query groups of its own, so its folds are drawn here, by whole group.
    group_of_row = np.repeat(np.arange(len(data.group_sizes)), data.group_sizes)
    fold_of_group = np.random.default_rng(params.seed).permutation(len(data.group_sizes)) % folds
    splits = [
        (np.flatnonzero(fold_of_group[group_of_row] != f), np.flatnonzero(fold_of_group[group_of_row] == f))
        for f in range(folds)
    ]
    curves = lgb.cv(
        dict(lgb_settings),
        _dataset(data, params, feature_names),
        num_boost_round=params.max_rounds,
        folds=splits,
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
    )
    mean = np.asarray(curves["valid ndcg@20-mean"])
    return int(mean.argmax()) + 1
