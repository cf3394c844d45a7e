"""Answering feeds from a loaded bundle: candidates from every source (ALS through FAISS), ranked by the
LightGBM ranker with the bundle's feature state, then the fallback chain.

Batch `sharefeed recommend` and the HTTP feed both call `Recommender.feed`, so a user with no events
since training gets the same items from either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.candidates import (
    SOURCE_ORDER,
    PopularLists,
    candidate_features,
    merge_candidates,
    top_scores,
    user_candidates,
)
from features.feed import Candidates, Feed, Source, compose_feed
from features.popularity import ranked
from features.repurchase import NO_CATEGORY
from training.bundle import Bundle
from training.ranker import Ranker

FALLBACK_DEPTH = 2000  # how far down the trending and popular lists a feed may reach
RETRIEVAL_MARGIN = 32  # over-fetch beyond n + blocked items, so filters rarely leave a feed short
_HISTORY_SOURCES = frozenset({Source.ALS, Source.BPR, Source.ITEM_KNN})  # explained by a similar past item


@dataclass(frozen=True, slots=True)
class FeedItem:
    item_id: str
    score: float
    source: Source
    reason: str


@dataclass(frozen=True, slots=True)
class FeedResult:
    user_id: str
    items: tuple[FeedItem, ...]
    personalized: bool
    step: Source | None


class Recommender:
    """Read-only after construction, so one instance serves concurrent requests."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        meta = bundle.item_meta
        self._category = meta["category"].fillna(NO_CATEGORY).to_numpy(dtype=object)
        self._out_of_stock = (meta["in_stock"].fillna(True) == False).to_numpy(dtype=bool)  # noqa: E712
        policy = bundle.manifest.repurchase
        self._once_only = ~policy.repeatable_mask(self._category)
        pop = bundle.popularity
        trending, popular = ranked(pop.trending, FALLBACK_DEPTH), ranked(pop.popular, FALLBACK_DEPTH)
        self._trending = Candidates(Source.TRENDING, trending, pop.trending[trending])
        self._popular = Candidates(Source.POPULAR, popular, pop.popular[popular])
        groups = pd.Series(np.arange(len(self._category))).groupby(self._category).indices
        self._by_category: dict[str, np.ndarray] = {str(k): np.asarray(v, dtype=np.int64) for k, v in groups.items()}
        norms = np.linalg.norm(bundle.item_factors, axis=1, keepdims=True)
        self._unit_items = bundle.item_factors / np.maximum(norms, 1e-12)
        self._ranker = Ranker.from_string(bundle.ranker_text) if bundle.ranker_text else None
        self._lists = PopularLists.from_state(bundle.state)
        self._k = {Source(name): int(k) for name, k in bundle.manifest.candidates.items()}
        if hasattr(bundle.index, "hnsw"):
            bundle.index.hnsw.efSearch = bundle.manifest.model.ef_search

    @property
    def version(self) -> str:
        return self.bundle.version

    def _blocked(self, user_idx: int | None, exclude: Sequence[str], category: str | None,
                 personalized: bool) -> np.ndarray:
        mask = self._out_of_stock.copy()
        if personalized and user_idx is not None:
            bought = self.bundle.bought
            items = bought.indices[bought.indptr[user_idx] : bought.indptr[user_idx + 1]]
            mask[items[self._once_only[items]]] = True
        if exclude:
            codes = self.bundle.items.indexes(list(exclude))
            mask[codes[codes >= 0]] = True
        if category is not None:
            mask |= self._category != category
        return mask

    def _retrieve(self, user_idx: int, n: int, blocked: np.ndarray, category: str | None) -> Candidates:
        vector = self.bundle.user_factors[user_idx : user_idx + 1]
        if category is not None:
            members = self._by_category.get(category, np.empty(0, dtype=np.int64))
            scores = self.bundle.item_factors[members] @ vector[0]
            order = np.argsort(-scores, kind="stable")
            return Candidates(Source.ALS, members[order], scores[order])
        n_items = len(blocked)
        k = min(n_items, n + int(blocked.sum()) + RETRIEVAL_MARGIN)
        while True:
            scores, items = self.bundle.index.search(vector, k)
            found = items[0] >= 0
            kept = (~blocked[items[0][found]]).sum()
            if kept >= n or k >= n_items:
                return Candidates(Source.ALS, items[0][found].astype(np.int64), scores[0][found])
            k = min(n_items, k * 2)

    def _rank(self, user_idx: int, blocked: np.ndarray, category: str | None) -> Candidates:
        """Every source's candidates for the user, merged and ordered by the ranker."""
        assert self._ranker is not None
        models, state = self.bundle.models, self.bundle.state
        factor_lists = {
            Source.ALS: self._factor_top(self._retrieve(user_idx, self._k[Source.ALS], blocked, category),
                                         self._k[Source.ALS], blocked),
            Source.BPR: top_scores(models.bpr_items @ models.bpr_users[user_idx], self._k[Source.BPR], blocked),
        }
        lists = user_candidates(state, models, self._lists, user_idx, self._k, blocked, factor_lists)
        items, scores, ranks, first, _ = merge_candidates(lists, self.bundle.manifest.union_size)
        if not len(items):
            return Candidates(Source.ALS, items, np.empty(0, dtype=np.float32))
        rows = np.full(len(items), user_idx, dtype=np.int64)
        predicted = self._ranker.predict(candidate_features(state, models, rows, items, scores, ranks))
        order = np.argsort(-predicted, kind="stable")
        return Candidates(Source.ALS, items[order], predicted[order].astype(np.float32),
                          tuple(SOURCE_ORDER[i] for i in first[order].tolist()))

    @staticmethod
    def _factor_top(retrieved: Candidates, k: int, blocked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = ~blocked[retrieved.items]
        return retrieved.items[keep][:k], retrieved.scores[keep][:k]

    def _category_trending(self, category: str) -> Candidates:
        members = self._by_category.get(category, np.empty(0, dtype=np.int64))
        trending = self.bundle.popularity.trending[members]
        popular = self.bundle.popularity.popular[members]
        order = np.lexsort((members, -popular, -trending))
        chosen = members[order][:FALLBACK_DEPTH]
        return Candidates(Source.TRENDING_CATEGORY, chosen, trending[order][:FALLBACK_DEPTH])

    def feed(self, user_id: str, n: int, *, category: str | None = None, exclude: Sequence[str] = (),
             personalized: bool = True) -> FeedResult:
        user_idx = self.bundle.users.index_of(user_id) if personalized else None
        blocked = self._blocked(user_idx, exclude, category, personalized)
        chain: list[Candidates] = []
        if user_idx is not None and self._ranker is not None:
            chain.append(self._rank(user_idx, blocked, category))
        elif user_idx is not None:
            chain.append(self._retrieve(user_idx, n, blocked, category))
        if category is not None:
            chain.append(self._category_trending(category))
        chain += [self._trending, self._popular]
        feed = compose_feed(chain, n, blocked)
        return FeedResult(user_id, self._items(feed, user_idx), user_idx is not None, feed.step)

    def _items(self, feed: Feed, user_idx: int | None) -> tuple[FeedItem, ...]:
        ids = self.bundle.items.ids
        anchors = self._anchors(feed, user_idx)
        return tuple(
            FeedItem(str(ids[idx]), float(score), source, self._reason(source, idx, anchors.get(idx)))
            for idx, score, source in zip(feed.items.tolist(), feed.scores.tolist(), feed.sources, strict=True)
        )

    def _anchors(self, feed: Feed, user_idx: int | None) -> dict[int, int]:
        """For each personal pick, the item of the user's recent history it is most like (cosine)."""
        if user_idx is None:
            return {}
        recent = self.bundle.recent
        history = recent.indices[recent.indptr[user_idx] : recent.indptr[user_idx + 1]]
        picks = [i for i, s in zip(feed.items.tolist(), feed.sources, strict=True) if s in _HISTORY_SOURCES]
        if not len(history) or not picks:
            return {}
        similarity = self._unit_items[picks] @ self._unit_items[history].T
        for row, pick in enumerate(picks):  # an item is not its own explanation
            similarity[row, history == pick] = -np.inf
        best = history[np.argmax(similarity, axis=1)]
        return {pick: int(anchor) for pick, anchor in zip(picks, best.tolist(), strict=True) if anchor != pick}

    def _label(self, item_idx: int) -> str:
        title = self.bundle.item_meta["title"].iloc[item_idx]
        return str(title) if isinstance(title, str) and title else self.bundle.items.id_of(item_idx)

    def _reason(self, source: Source, item_idx: int, anchor: int | None) -> str:
        category = self._category[item_idx]
        if source in _HISTORY_SOURCES:
            if anchor is None:
                return "picked for your taste from what you browsed and bought"
            return f"similar to {self._label(anchor)} you looked at"
        if source is Source.REPEAT:
            return "you bought this before"
        if source is Source.NEW_ARRIVALS:
            return f"new in {category}" if category else "new arrival"
        if source is Source.CATEGORY_TRENDING:
            return f"trending in {category}, a category you like" if category else "trending now"
        if source in (Source.TRENDING, Source.TRENDING_CATEGORY):
            return f"trending in {category}" if category else "trending now"
        return f"popular in {category}" if category else "popular with shoppers"
