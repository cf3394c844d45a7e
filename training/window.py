"""One time window of the two-stage recommender: models fit before a cut-off, features as of it, and
the candidate rows (with features) for a set of users.

Training uses three windows (PITFALLS: candidates fit on [T0, T1) with labels from [T1, T2); for the
reported test, refit on [T0, T2) with labels from [T2, T3)) and the bundle a fourth, as of "now"; all
are built by `fit_window` so they cannot differ in anything but their cut-off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.candidates import (
    CandidateModels,
    PopularLists,
    candidate_features,
    factor_scores,
    merge_candidates,
    top_scores,
    user_candidates,
)
from features.feed import Source
from features.interactions import user_items_matrix
from features.ranking import SOURCE_FEATURES
from features.repurchase import NO_CATEGORY, RepurchasePolicy, infer_repurchase_policy
from features.state import FeatureState, build_state
from features.vocab import Vocabulary
from features.weights import CONVERSION_TYPES
from training.models import fit_candidate_models
from training.params import TrainParams

CHUNK = 256
LABEL_GAIN = {"purchase": 2, "add_to_cart": 1}


@dataclass(slots=True)
class Window:
    cutoff: pd.Timestamp
    users: Vocabulary
    items: Vocabulary
    item_meta: pd.DataFrame
    models: CandidateModels
    state: FeatureState
    lists: PopularLists
    policy: RepurchasePolicy
    blocked: sp.csr_matrix  # users x items: bought, in a category not to be offered again
    categories: list[str]
    brands: list[str]


def item_vocabulary(events: pd.DataFrame, catalog: pd.DataFrame | None) -> Vocabulary:
    """Items with events first, then catalog items nobody has touched yet (they still need metadata)."""
    ids = events["item_id"]
    if catalog is not None:
        ids = pd.concat([ids, catalog["item_id"]], ignore_index=True)
    return Vocabulary.from_ids(ids)


def item_meta_frame(items: Vocabulary, catalog: pd.DataFrame | None, columns: tuple[str, ...]) -> pd.DataFrame:
    """Catalog fields per item idx; absent fields stay missing (features declare their own defaults)."""
    frame = pd.DataFrame({"item_id": pd.Series(items.ids, dtype="str")})
    if catalog is not None:
        frame = frame.merge(catalog, on="item_id", how="left")
    for column in columns:
        if column not in frame.columns:
            frame[column] = np.nan  # float NaN converts to every column type below as "missing"
    meta = frame[list(columns)].copy()
    for text in ("category", "brand", "title"):
        meta[text] = meta[text].astype("str")
    meta["price"] = meta["price"].astype("float64")
    meta["in_stock"] = meta["in_stock"].astype("boolean")
    meta["created_at"] = pd.to_datetime(meta["created_at"], utc=True)
    return meta


def bought_matrix(events: pd.DataFrame, users: Vocabulary, items: Vocabulary) -> sp.csr_matrix:
    conversions = events.loc[events["event_type"].isin(CONVERSION_TYPES)]
    rows, cols = users.indexes(conversions["user_id"]), items.indexes(conversions["item_id"])
    keep = (rows >= 0) & (cols >= 0)
    matrix = sp.csr_matrix(
        (np.ones(keep.sum(), dtype=np.float32), (rows[keep], cols[keep])), shape=(len(users), len(items))
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def blocked_matrix(bought: sp.csr_matrix, meta: pd.DataFrame, policy: RepurchasePolicy) -> sp.csr_matrix:
    """Bought items the policy does not allow to be recommended again."""
    categories = meta["category"].fillna(NO_CATEGORY).to_numpy(dtype=object)
    once_only = (~policy.repeatable_mask(categories)).astype(np.float32)
    blocked = sp.csr_matrix(bought @ sp.diags(once_only))
    blocked.eliminate_zeros()
    return blocked


def repurchase_policy(events: pd.DataFrame, catalog: pd.DataFrame | None, params: TrainParams) -> RepurchasePolicy:
    category = catalog.set_index("item_id")["category"] if catalog is not None else pd.Series(dtype="str")
    return infer_repurchase_policy(
        events,
        category,
        threshold=params.repurchase.threshold,
        min_pairs=params.repurchase.min_pairs,
        overrides=params.repurchase.overrides,
    )


def fit_window(
    events: pd.DataFrame,
    catalog: pd.DataFrame | None,
    params: TrainParams,
    cutoff: pd.Timestamp,
    meta_columns: tuple[str, ...],
    social: pd.DataFrame | None = None,
) -> Window:
    """Fit every candidate model on the events before `cutoff` and build the feature state as of it.

    `social` is the friend / follow table (it has no times: ties are taken as known at every cut-off).
    """
    past = events.loc[events["ts"] < cutoff]
    users = Vocabulary.from_ids(past["user_id"])
    items = item_vocabulary(past, catalog)
    meta = item_meta_frame(items, catalog, meta_columns)
    weights = params.weights
    matrix = user_items_matrix(
        past, users, items, weights, now=cutoff, half_life_days=params.als.recency_half_life_days
    )
    models = fit_candidate_models(matrix, params)
    categories = sorted(str(c) for c in meta["category"].dropna().unique())
    brands = sorted(str(b) for b in meta["brand"].dropna().unique())
    state = build_state(past, users, items, meta, weights, cutoff, categories, brands, social)
    policy = repurchase_policy(past, catalog, params)
    blocked = blocked_matrix(bought_matrix(past, users, items), meta, policy)
    return Window(
        cutoff, users, items, meta, models, state, PopularLists.from_state(state), policy, blocked, categories, brands
    )


def labels_between(events: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp | None) -> pd.DataFrame:
    """What each user bought (gain 2) or carted (gain 1) in [start, end): the ranker's labels."""
    mask = (events["ts"] >= start) if end is None else (events["ts"] >= start) & (events["ts"] < end)
    window = events.loc[mask & events["event_type"].isin(list(LABEL_GAIN)), ["user_id", "item_id", "event_type"]]
    window = window.assign(label=window["event_type"].map(LABEL_GAIN).astype(np.int32))
    return window.groupby(["user_id", "item_id"], sort=False)["label"].max().reset_index()


@dataclass(slots=True)
class CandidateRows:
    """The candidate union of many users: one group of rows per user, in `user_ids` order."""

    user_ids: list[str]
    user_idx: np.ndarray  # window row per group, -1 for users the window does not know
    group_sizes: np.ndarray
    items: np.ndarray  # item idx per row
    features: np.ndarray  # rows x FEATURE_NAMES
    first_source: np.ndarray  # per row: index into SOURCE_ORDER of the source ranking it highest
    fused: np.ndarray  # per row: reciprocal-rank fusion score (the union without a ranker)
    per_source: dict[str, list[np.ndarray]] = field(default_factory=dict)  # source -> per-user ranked items
    seconds: float = 0.0

    def group_slices(self) -> list[slice]:
        ends = np.cumsum(self.group_sizes)
        return [slice(int(e - n), int(e)) for e, n in zip(ends, self.group_sizes, strict=True)]


def candidate_rows(window: Window, user_ids: list[str], params: TrainParams, union_size: int) -> CandidateRows:
    """Generate, merge and describe the candidates of `user_ids` (external ids) as of the window."""
    started = time.perf_counter()
    user_idx = window.users.indexes(pd.Series(user_ids, dtype="str"))
    counts = params.candidate_counts()
    k = {Source(name): counts[name] for name in SOURCE_FEATURES}
    mask = np.zeros(len(window.items), dtype=bool)
    groups: list[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray]] = []
    per_source: dict[str, list[np.ndarray]] = {s: [] for s in SOURCE_FEATURES}
    models, state = window.models, window.state
    for start in range(0, len(user_idx), CHUNK):
        chunk = user_idx[start : start + CHUNK]
        als = factor_scores(models.als_users, models.als_items, chunk)
        bpr = factor_scores(models.bpr_users, models.bpr_items, chunk)
        for row, user in enumerate(chunk.tolist()):
            blocked = (
                window.blocked.indices[window.blocked.indptr[user] : window.blocked.indptr[user + 1]]
                if user >= 0
                else np.empty(0, dtype=np.int64)
            )
            mask[blocked] = True
            factor_lists = {}
            if user >= 0:
                factor_lists[Source.ALS] = top_scores(als[row], k[Source.ALS], mask)
                factor_lists[Source.BPR] = top_scores(bpr[row], k[Source.BPR], mask)
            lists = user_candidates(state, models, window.lists, user, k, mask, factor_lists)
            mask[blocked] = False
            groups.append(merge_candidates(lists, union_size))
            by_source = {c.source.value: c.items for c in lists}
            for name in SOURCE_FEATURES:
                per_source[name].append(by_source.get(name, np.empty(0, dtype=np.int64)))
    sizes = np.asarray([len(g[0]) for g in groups], dtype=np.int64)
    items = np.concatenate([g[0] for g in groups]) if groups else np.empty(0, dtype=np.int64)
    rows_user = np.repeat(user_idx, sizes)
    scores = {s: np.concatenate([g[1][s] for g in groups]) for s in SOURCE_FEATURES} if groups else {}
    ranks = {s: np.concatenate([g[2][s] for g in groups]) for s in SOURCE_FEATURES} if groups else {}
    features = candidate_features(state, models, rows_user, items, scores, ranks)
    first = np.concatenate([g[3] for g in groups]) if groups else np.empty(0, dtype=np.int64)
    fused = np.concatenate([g[4] for g in groups]) if groups else np.empty(0, dtype=np.float32)
    return CandidateRows(
        user_ids, user_idx, sizes, items, features, first, fused, per_source, time.perf_counter() - started
    )


def attach_labels(rows: CandidateRows, window: Window, labels: pd.DataFrame) -> np.ndarray:
    """Label per row (0 when the user did not buy or cart the item in the label window)."""
    if labels.empty:
        return np.zeros(len(rows.items), dtype=np.int32)
    lookup = {(u, i): int(g) for u, i, g in zip(labels["user_id"], labels["item_id"], labels["label"], strict=True)}
    item_ids = window.items.ids
    users = np.repeat(np.asarray(rows.user_ids, dtype=object), rows.group_sizes)
    return np.fromiter(
        (lookup.get((u, item_ids[i]), 0) for u, i in zip(users, rows.items.tolist(), strict=True)),
        dtype=np.int32,
        count=len(rows.items),
    )
