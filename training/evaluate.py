"""Offline evaluation on the time holdout: the model and its baselines on the same split, same users.

Every model's list is composed by `features.feed.compose_feed` with the same blocked items (purchases
that the repurchase policy does not allow again), so the numbers describe what serving would show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from features.vocab import Vocabulary
from features.weights import CONVERSION_TYPES

CURVE_K = (1, 2, 5, 10, 15, 20)


@dataclass(frozen=True, slots=True)
class Targets:
    """What each evaluated user did in the test window, as train item indexes (-1: unseen item)."""

    user_ids: np.ndarray  # external ids of evaluated users
    user_idx: np.ndarray  # train row, -1 for users without history
    items: list[np.ndarray]  # per user: target item idx (only items known to training)
    n_targets: np.ndarray  # per user: all targets, unseen items included
    target_kind: str
    unseen_item_share: float
    cold_user_share: float


@dataclass(slots=True)
class EvalReport:
    k: tuple[int, ...]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    users: int = 0
    target_kind: str = ""
    unseen_item_share: float = 0.0
    cold_user_share: float = 0.0
    comparison: dict[str, float | str] = field(default_factory=dict)  # ranker vs best baseline, with CI
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # new / returning users: NDCG@K
    ablation: dict[str, float | str] = field(default_factory=dict)  # ranker vs ranker_no_social, with CI
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # model -> metric -> value per CURVE_K
    replay_rows: dict[str, dict[str, float]] = field(default_factory=dict)  # request-time replay, per (user, slice)
    replay: dict[str, float | str] = field(default_factory=dict)  # its ratio with CI, groups and cost

    def table(self) -> pd.DataFrame:
        return pd.DataFrame.from_dict(self.rows, orient="index")

    def flat_metrics(self) -> dict[str, float]:
        out = {f"{model}.{metric}": value for model, row in self.rows.items() for metric, value in row.items()}
        out["holdout.users"] = float(self.users)
        out["holdout.unseen_item_share"] = self.unseen_item_share
        out["holdout.cold_user_share"] = self.cold_user_share
        out |= {f"comparison.{k}": float(v) for k, v in self.comparison.items() if not isinstance(v, str)}
        out |= {f"ablation.{k}": float(v) for k, v in self.ablation.items() if not isinstance(v, str)}
        out |= {f"replay.{model}.{metric}": value for model, row in self.replay_rows.items()
                for metric, value in row.items()}
        out |= {f"replay.{k}": float(v) for k, v in self.replay.items() if not isinstance(v, str)}
        for group, row in self.breakdown.items():
            out |= {f"{group}.{model}.ndcg": value for model, value in row.items() if model != "users"}
            out[f"{group}.users"] = row.get("users", 0.0)
        return out


def holdout_targets(test: pd.DataFrame, users: Vocabulary, items: Vocabulary,
                    weights: dict[str, float]) -> Targets:
    """Conversions in the test window per user; positive signals when the window holds no conversion."""
    conversions = test.loc[test["event_type"].isin(CONVERSION_TYPES)]
    kind = "purchase"
    if conversions.empty:
        positive = [t for t, w in weights.items() if w > 0]
        conversions = test.loc[test["event_type"].isin(positive)]
        kind = "positive events"
    return targets_from_pairs(conversions[["user_id", "item_id"]], users, items, kind)


def targets_from_pairs(pairs: pd.DataFrame, users: Vocabulary, items: Vocabulary, kind: str) -> Targets:
    """Targets from (user_id, item_id) rows: each user's distinct items, as indexes of `items`."""
    pairs = pairs[["user_id", "item_id"]].drop_duplicates()
    pairs = pairs.assign(item_idx=items.indexes(pairs["item_id"]))
    grouped = pairs.groupby("user_id", sort=True)
    user_ids = np.asarray(list(grouped.groups.keys()), dtype=object)
    per_user = [g["item_idx"].to_numpy() for _, g in grouped]
    user_idx = users.indexes(pd.Series(user_ids, dtype="str"))
    return Targets(
        user_ids=user_ids,
        user_idx=user_idx,
        items=[t[t >= 0] for t in per_user],
        n_targets=np.asarray([len(t) for t in per_user], dtype=np.int64),
        target_kind=kind,
        unseen_item_share=float((pairs["item_idx"] < 0).mean()) if len(pairs) else 0.0,
        cold_user_share=float((user_idx < 0).mean()) if len(user_idx) else 0.0,
    )


def _user_metrics(recs: np.ndarray, targets: np.ndarray, n_targets: int, k: int) -> tuple[float, float, float, float]:
    """Recall, NDCG, hit and average precision at k for one user."""
    top = recs[:k]
    hits = np.isin(top, targets)
    if not hits.any() or n_targets == 0:
        return 0.0, 0.0, 0.0, 0.0
    discounts = 1.0 / np.log2(np.arange(2, len(top) + 2))
    ideal = discounts[: min(n_targets, k)].sum()
    precision_at_hits = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    average_precision = float(precision_at_hits.sum() / min(n_targets, k))
    return float(hits.sum() / n_targets), float(discounts[hits].sum() / ideal), 1.0, average_precision


def per_user_metrics(lists: Sequence[np.ndarray], targets: Targets, k: int) -> np.ndarray:
    """NDCG@k of every user, for confidence intervals and breakdowns."""
    return np.asarray([_user_metrics(recs, t, int(n), k)[1]
                       for recs, t, n in zip(lists, targets.items, targets.n_targets, strict=True)])


def bootstrap_ratio(ours: np.ndarray, theirs: np.ndarray, rng: np.random.Generator,
                    samples: int = 1000) -> tuple[float, float, float]:
    """95% interval of mean(ours) / mean(theirs) with users resampled; and the ratio itself."""
    ratio = float(ours.mean() / theirs.mean()) if theirs.mean() > 0 else float("inf")
    if len(ours) == 0:
        return float("nan"), ratio, float("nan")
    picks = rng.integers(0, len(ours), size=(samples, len(ours)))
    a, b = ours[picks].mean(axis=1), theirs[picks].mean(axis=1)
    ratios = np.divide(a, b, out=np.full(samples, np.inf), where=b > 0)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), ratio, float(high)


def score_lists(lists: Sequence[np.ndarray], targets: Targets, ks: Sequence[int], n_items: int) -> dict[str, float]:
    """Recall@K, NDCG@K, HitRate@K averaged over users, and catalog coverage at the largest K."""
    row: dict[str, float] = {}
    for k in ks:
        values = np.asarray(
            [_user_metrics(recs, t, int(n), k) for recs, t, n in zip(lists, targets.items, targets.n_targets,
                                                                    strict=True)]
        )
        row[f"recall_at_{k}"] = float(values[:, 0].mean())
        row[f"ndcg_at_{k}"] = float(values[:, 1].mean())
        row[f"hit_rate_at_{k}"] = float(values[:, 2].mean())
        row[f"map_at_{k}"] = float(values[:, 3].mean())
    shown = np.unique(np.concatenate([recs[: max(ks)] for recs in lists])) if lists else np.array([])
    row["coverage"] = float(len(shown) / n_items) if n_items else 0.0
    return row


def metric_curves(lists: Sequence[np.ndarray], targets: Targets, n_items: int) -> dict[str, list[float]]:
    """Recall, NDCG and hit rate at each of CURVE_K, for the metric-vs-K plots."""
    rows = score_lists(lists, targets, CURVE_K, n_items)
    return {metric: [rows[f"{metric}_at_{k}"] for k in CURVE_K] for metric in ("recall", "ndcg", "hit_rate")}
