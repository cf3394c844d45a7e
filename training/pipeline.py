"""`sharefeed train`: data directory -> validated events -> holdout evaluation -> refit -> bundle -> MLflow.

Reads top to bottom as the stages run. The holdout measures ALS against the popularity baselines on the
same users; the served model is then refit on all the data so it knows the latest events.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.dataset import Dataset, load_dataset
from features.interactions import user_items_matrix
from features.popularity import item_popularity
from features.repurchase import NO_CATEGORY, RepurchasePolicy, infer_repurchase_policy
from features.vocab import Vocabulary
from features.weights import CONVERSION_TYPES
from training import tracking
from training.als import fit_als
from training.bundle import (
    ITEM_META_COLUMNS,
    SCHEMA_VERSION,
    BundleContents,
    DataWindow,
    HoldoutInfo,
    Manifest,
    ModelInfo,
    write_bundle,
)
from training.evaluate import (
    EvalReport,
    als_chains,
    fallback_chain,
    holdout_targets,
    recommend_lists,
    score_lists,
)
from training.index import build_item_index, index_kind
from training.params import TrainParams
from training.settings import TrainingSettings
from training.split import Holdout, time_holdout

RECENT_ITEMS = 50  # per user, kept in the bundle for explanations and history-based candidates
FEATURE_SET = ("user_items:summed_weights", "popular:distinct_users", "trending:decayed_weights",
               "repurchase:category_rate", *ITEM_META_COLUMNS)


@dataclass(slots=True)
class StageClock:
    """Wall time per stage, reported as it goes (long steps show progress) and logged to MLflow."""

    say: Callable[[str], None]
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"[{name}] ...")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.say(f"[{name}] done in {self.seconds[name]:.1f}s")


@dataclass(frozen=True, slots=True)
class TrainResult:
    bundle_path: Path
    manifest: Manifest
    report: EvalReport
    summary: pd.DataFrame
    rejects_path: Path
    run_id: str
    stage_seconds: dict[str, float]


def _item_vocabulary(events: pd.DataFrame, catalog: pd.DataFrame | None) -> Vocabulary:
    """Items with events first, then catalog items nobody has touched yet (they still need metadata)."""
    ids = events["item_id"]
    if catalog is not None:
        ids = pd.concat([ids, catalog["item_id"]], ignore_index=True)
    return Vocabulary.from_ids(ids)


def _item_meta(items: Vocabulary, catalog: pd.DataFrame | None) -> pd.DataFrame:
    """Catalog fields per item idx; absent fields stay missing (features declare their own defaults)."""
    frame = pd.DataFrame({"item_id": pd.Series(items.ids, dtype="str")})
    if catalog is not None:
        frame = frame.merge(catalog, on="item_id", how="left")
    for column in ITEM_META_COLUMNS:
        if column not in frame.columns:
            frame[column] = pd.Series(pd.NA, index=frame.index)
    meta = frame[list(ITEM_META_COLUMNS)].copy()
    meta["category"] = meta["category"].astype("str")
    meta["brand"] = meta["brand"].astype("str")
    meta["title"] = meta["title"].astype("str")
    meta["price"] = meta["price"].astype("float64")
    meta["in_stock"] = meta["in_stock"].astype("boolean")
    meta["created_at"] = pd.to_datetime(meta["created_at"], utc=True)
    return meta


def _bought(events: pd.DataFrame, users: Vocabulary, items: Vocabulary) -> sp.csr_matrix:
    conversions = events.loc[events["event_type"].isin(CONVERSION_TYPES)]
    rows, cols = users.indexes(conversions["user_id"]), items.indexes(conversions["item_id"])
    keep = (rows >= 0) & (cols >= 0)
    matrix = sp.csr_matrix((np.ones(keep.sum(), dtype=np.float32), (rows[keep], cols[keep])),
                           shape=(len(users), len(items)))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def _recent(events: pd.DataFrame, users: Vocabulary, items: Vocabulary, weights: dict[str, float],
            cap: int) -> sp.csr_matrix:
    """Each user's latest `cap` items with a positive signal, valued by the time of the last one."""
    positive = events.loc[events["event_type"].map(weights).fillna(0.0) > 0, ["user_id", "item_id", "ts"]]
    last = positive.groupby(["user_id", "item_id"], sort=False)["ts"].max().reset_index()
    last = last.sort_values("ts", ascending=False, kind="stable")
    last = last.loc[last.groupby("user_id", sort=False).cumcount() < cap]
    rows, cols = users.indexes(last["user_id"]), items.indexes(last["item_id"])
    seconds = last["ts"].astype("int64").to_numpy() / 1e9
    keep = (rows >= 0) & (cols >= 0)
    return sp.csr_matrix((seconds[keep], (rows[keep], cols[keep])), shape=(len(users), len(items)))


def _blocked(bought: sp.csr_matrix, meta: pd.DataFrame, policy: RepurchasePolicy) -> sp.csr_matrix:
    """Bought items the policy does not allow to be recommended again."""
    categories = meta["category"].fillna(NO_CATEGORY).to_numpy(dtype=object)
    once_only = (~policy.repeatable_mask(categories)).astype(np.float32)
    blocked = bought @ sp.diags(once_only)
    blocked = sp.csr_matrix(blocked)
    blocked.eliminate_zeros()
    return blocked


def _policy(events: pd.DataFrame, catalog: pd.DataFrame | None, params: TrainParams) -> RepurchasePolicy:
    category = (catalog.set_index("item_id")["category"] if catalog is not None
                else pd.Series(dtype="str"))
    return infer_repurchase_policy(events, category, threshold=params.repurchase.threshold,
                                   min_pairs=params.repurchase.min_pairs,
                                   overrides=params.repurchase.overrides)


def evaluate_on_holdout(data: Dataset, holdout: Holdout, params: TrainParams, clock: StageClock) -> EvalReport:
    """Fit on the train part; score ALS and the popularity baselines on the test part's users."""
    weights = params.weights
    train = holdout.train
    users = Vocabulary.from_ids(train["user_id"])
    items = _item_vocabulary(train, None)
    meta = _item_meta(items, data.items)
    as_of = holdout.cut if holdout.cut is not None else train["ts"].max()
    with clock.stage("holdout: fit ALS"):
        matrix = user_items_matrix(train, users, items, weights, now=as_of,
                                   half_life_days=params.als.recency_half_life_days)
        factors = fit_als(matrix, params.als)
    popularity = item_popularity(train, items, weights, as_of, params.popularity.trending_half_life_days)
    blocked = _blocked(_bought(train, users, items), meta, _policy(train, data.items, params))
    targets = holdout_targets(holdout.test, users, items, weights)
    n = max(params.evaluation.k)
    fallback = fallback_chain(popularity, n + 1000)
    report = EvalReport(k=params.evaluation.k, users=len(targets.user_ids), target_kind=targets.target_kind,
                        unseen_item_share=targets.unseen_item_share, cold_user_share=targets.cold_user_share)
    candidates = {
        "popular": lambda chunk: [[fallback[1]] for _ in chunk],
        "trending": lambda chunk: [fallback for _ in chunk],
        "als": als_chains(factors.user_factors, factors.item_factors, blocked, fallback, n),
    }
    with clock.stage("holdout: evaluate"):
        for name, chains in candidates.items():
            lists = recommend_lists(targets, n, len(items), blocked, chains)
            report.rows[name] = score_lists(lists, targets, params.evaluation.k, len(items))
    return report


def _feature_set_digest(params: TrainParams) -> str:
    parts = [*FEATURE_SET, str(sorted(params.weights.items())), params.als.confidence_scale,
             str(params.popularity.trending_half_life_days)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def train(
    data_dir: Path,
    out: Path,
    params: TrainParams,
    settings: TrainingSettings,
    *,
    rejects_path: Path | None = None,
    say: Callable[[str], None] = print,
) -> TrainResult:
    clock = StageClock(say)
    rejects_path = rejects_path or out.with_name(f"{out.name}.rejects.csv")
    with clock.stage("load and validate"):
        data = load_dataset(data_dir, params.weights.keys())
        data.write_rejects(rejects_path)
        say(data.summary().to_string(index=False))
        data.enforce_reject_limit(params.max_reject_share, rejects_path)
    events = data.events
    if events.empty:
        raise ValueError(f"{data_dir}: no valid events to train on")
    now = pd.Timestamp(settings.now).tz_convert("UTC") if settings.now else events["ts"].max()

    with tracking.tracked_run(settings, run_name=f"train {Path(data_dir).name}") as run_id:
        tracking.log_params(params.flat() | {"data_dir": str(data_dir), "now": now.isoformat()})
        holdout = time_holdout(events, params.split)
        say(f"holdout: {holdout.note}; train {len(holdout.train):,} / test {len(holdout.test):,} events")
        report = evaluate_on_holdout(data, holdout, params, clock)
        say(f"evaluated {report.users:,} users on {report.target_kind}; unseen-item share "
            f"{report.unseen_item_share:.1%}, cold-user share {report.cold_user_share:.1%}")
        say(report.table().round(4).to_string())

        with clock.stage("refit on all data"):
            users = Vocabulary.from_ids(events["user_id"])
            items = _item_vocabulary(events, data.items)
            matrix = user_items_matrix(events, users, items, params.weights, now=now,
                                       half_life_days=params.als.recency_half_life_days)
            factors = fit_als(matrix, params.als)
            meta = _item_meta(items, data.items)
            policy = _policy(events, data.items, params)
            popularity = item_popularity(events, items, params.weights, now,
                                         params.popularity.trending_half_life_days)
        with clock.stage("index"):
            index = build_item_index(factors.item_factors, params.index)
        with clock.stage("write bundle"):
            manifest = Manifest(
                schema_version=SCHEMA_VERSION,
                bundle_version="pending",
                created_at=datetime.now(UTC),
                params_digest=params.digest(),
                feature_set_digest=_feature_set_digest(params),
                data_window=DataWindow(start=events["ts"].min(), end=events["ts"].max(), now=now),
                holdout=HoldoutInfo(kind=holdout.kind, cut=holdout.cut, note=holdout.note),
                model=ModelInfo(factors=params.als.factors, regularization=params.als.regularization,
                                alpha=params.als.alpha, confidence_scale=params.als.confidence_scale,
                                index_kind=index_kind(len(items), params.index),
                                ef_search=params.index.ef_search),
                repurchase=policy,
                event_weights=params.weights,
                counts={"users": len(users), "items": len(items), "events": len(events)},
                metrics=report.flat_metrics(),
                mlflow_run_id=run_id,
                files={},
            )
            bundle = BundleContents(
                users=users, items=items, item_meta=meta, user_factors=factors.user_factors,
                item_factors=factors.item_factors, item_gram=factors.item_gram(), index=index,
                bought=_bought(events, users, items), popularity=popularity,
                recent=_recent(events, users, items, params.weights, RECENT_ITEMS),
            )
            manifest = write_bundle(out, bundle, manifest)
        tracking.log_metrics(report.flat_metrics() | {f"time.{k}_s": v for k, v in clock.seconds.items()})
        tracking.set_tags({"bundle_version": manifest.bundle_version, "holdout": holdout.kind})
        tracking.log_artifacts(rejects_path, "validation")
        tracking.log_artifacts(out, "bundle")
    say(f"bundle {manifest.bundle_version} written to {out} (MLflow run {run_id})")
    return TrainResult(out, manifest, report, data.summary(), rejects_path, run_id, dict(clock.seconds))
