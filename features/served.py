"""The served pipeline: which model answers a feed, its personal step, and the one function that builds a
user's final list from it.

Training's selection table, batch `recommend` and the HTTP feed all build a list with `final_list`, so the
list a pipeline was chosen on is the list that is served. A pipeline is either the ranker over the candidate
union or one source on its own: ALS factors, item-to-item weights (BM25 neighbours or EASE) summed over the
user's history, or plain popularity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import scipy.sparse as sp

from features.candidates import top_scores
from features.feed import Candidates, Feed, Source, compose_feed
from features.social_state import row_cells


class Pipeline(StrEnum):
    """What orders the personal part of a feed; the manifest names the one chosen on validation."""

    RANKER = "ranker"  # LightGBM over the union of every candidate source
    ALS = "als"  # ALS factors alone
    ITEM_KNN = "item_knn"  # BM25-weighted item neighbours summed over the user's history
    EASE = "ease"  # EASE item weights summed over the user's history (catalogs small enough to invert)
    TRENDING = "trending"  # no personal step: trending, then popular
    POPULAR = "popular"  # no personal step: all-time popular first
    FUSED = "fused"  # two of the above, each one's scores scaled to [0, 1] over its best items, then weighted


ITEM_WEIGHT_PIPELINES = frozenset({Pipeline.ITEM_KNN, Pipeline.EASE})
SOURCE_OF = {Pipeline.ALS: Source.ALS, Pipeline.ITEM_KNN: Source.ITEM_KNN, Pipeline.EASE: Source.EASE,
             Pipeline.TRENDING: Source.TRENDING, Pipeline.POPULAR: Source.POPULAR}
FUSION_DEPTH = 200  # items of each part that a fused list is blended from


@dataclass(frozen=True, slots=True)
class ItemWeights:
    """An item-to-item model: a user's score for item i is the sum over their history h of value(h) * W[h, i]."""

    weights: sp.csr_matrix  # items x items
    binary: bool  # EASE was fitted on a 0/1 matrix: the history counts each item once

    def scores(self, history_items: np.ndarray, history_values: np.ndarray, n_items: int) -> np.ndarray:
        values = np.ones(len(history_items)) if self.binary else np.asarray(history_values, dtype=np.float64)
        owner, cols, weight = row_cells(self.weights, np.asarray(history_items, dtype=np.int64))
        if not len(cols):
            return np.zeros(n_items, dtype=np.float64)
        return np.bincount(cols, weights=weight * values[owner], minlength=n_items)


def history_of(pair_weight: sp.csr_matrix, row: int) -> tuple[np.ndarray, np.ndarray]:
    """A user's items with a positive summed weight, and those weights."""
    start, end = pair_weight.indptr[row], pair_weight.indptr[row + 1]
    items, values = pair_weight.indices[start:end], pair_weight.data[start:end]
    positive = values > 0
    return items[positive].astype(np.int64), values[positive]


def personal_step(pipeline: Pipeline, depth: int, blocked: np.ndarray, *, user_vector: np.ndarray | None = None,
                  item_factors: np.ndarray | None = None, item_weights: ItemWeights | None = None,
                  history: tuple[np.ndarray, np.ndarray] | None = None,
                  popularity: np.ndarray | None = None) -> Candidates | None:
    """The single-source pipeline's best `depth` items for one user, blocked items skipped; None when the
    pipeline has no personal step or knows nothing of the user (the fallback then answers)."""
    if pipeline in ITEM_WEIGHT_PIPELINES:
        if item_weights is None or history is None or not len(history[0]):
            return None
        scores = item_weights.scores(history[0], history[1], len(blocked))
        scores[scores <= 0] = -np.inf  # an item no history item points to is no pick
    elif pipeline is Pipeline.ALS:
        if user_vector is None or item_factors is None:
            return None
        scores = item_factors @ user_vector
    elif pipeline in (Pipeline.TRENDING, Pipeline.POPULAR) and popularity is not None:
        scores = np.where(popularity > 0, popularity, -np.inf)
    else:
        return None
    items, values = top_scores(scores, depth, blocked)
    return Candidates(SOURCE_OF[pipeline], items, values)


def fuse(parts: Sequence[Candidates | None], weights: Sequence[float], depth: int) -> Candidates | None:
    """One list from several parts: each part's scores scaled to [0, 1] between its last and its best item,
    weighted and summed (an item a part did not propose gets 0 from it); each item keeps the source of the
    part that gave it the most."""
    present = [(c, w) for c, w in zip(parts, weights, strict=True) if c is not None and len(c.items)]
    if not present:
        return None
    items = np.concatenate([c.items for c, _ in present])
    scaled = []
    for c, w in present:
        s = c.scores.astype(np.float64)
        span = float(s[0] - s[-1])
        scaled.append(w * ((s - s[-1]) / span if span > 0 else np.ones(len(s))))
    values = np.concatenate(scaled)
    part = np.repeat(np.arange(len(present)), [len(c.items) for c, _ in present])
    unique, at = np.unique(items, return_inverse=True)
    total = np.bincount(at, weights=values, minlength=len(unique))
    order = np.lexsort((unique, -total))[:depth]
    strongest = np.lexsort((-values, at))  # per item, its largest contribution first
    heads = strongest[np.flatnonzero(np.diff(at[strongest], prepend=-1))]
    lead = np.empty(len(unique), dtype=np.int64)
    lead[at[heads]] = part[heads]
    sources = tuple(present[int(p)][0].source for p in lead[order])
    return Candidates(Source.FUSED, unique[order].astype(np.int64), total[order].astype(np.float32), sources)


def fallback_steps(trending: np.ndarray, popular: np.ndarray, depth: int, pipeline: Pipeline) -> list[Candidates]:
    """The non-personal end of every chain (trending, then popular); `popular` first for that pipeline."""
    steps = [_ranked(Source.TRENDING, trending, depth), _ranked(Source.POPULAR, popular, depth)]
    return steps[::-1] if pipeline is Pipeline.POPULAR else steps


def _ranked(source: Source, scores: np.ndarray, depth: int) -> Candidates:
    positive = np.flatnonzero(scores > 0)
    order = positive[np.lexsort((positive, -scores[positive]))][:depth]
    return Candidates(source, order.astype(np.int64), scores[order].astype(np.float32))


def final_list(personal: Sequence[Candidates], fallback: Sequence[Candidates], n: int,
               blocked: np.ndarray) -> Feed:
    """A user's final list: the personal steps, then the fallback, blocked and repeated items skipped."""
    return compose_feed([*personal, *fallback], n, blocked)


def seen_items(history: np.ndarray, bought: np.ndarray, repeatable: np.ndarray) -> np.ndarray:
    """The items of a user's history a list leaves out when the pipeline blocks seen items: all of them but
    the ones bought in a category that is bought again (a repeat buy may be due)."""
    again = bought[repeatable[bought]]
    return history[~np.isin(history, again)]
