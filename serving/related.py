"""Item lists that do not depend on a user: similar items, bought together, trending.

Similar items are cosine neighbours over L2-normalized ALS item factors (raw inner product collapses
onto popular items, PITFALLS), from a FAISS index built once per bundle. Items the model cannot place
(new in the catalog, or without events) get the catalog's content neighbours instead. Every list skips
items out of stock as the catalog says now.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import faiss
import numpy as np

from features.popularity import ranked
from serving.catalog import Catalog
from training.bundle import Bundle
from training.index import build_item_index
from training.params import IndexParams

FLAT_MAX_ITEMS = 50_000  # exact search below this (fast anyway); "pq" above (training.index): on the 100k
# items of the 1M-user bundle recall@53 0.95 against exact cosine (HNSW M32: 0.87), built in 0.7 s (HNSW: 5.6 s)
TRENDING_HOURS = 24
TRENDING_DEPTH = 2000
RRF_K = 60.0  # reciprocal-rank fusion constant: live and bundle trending merged by rank, not raw score
MIN_NORM = 1e-6


class ListSource(StrEnum):
    SIMILAR = "similar"  # cosine over ALS factors
    CONTENT = "content"  # same category / brand / price: the item is new to the model
    BOUGHT_TOGETHER = "bought_together"
    SIMILAR_IN_CATEGORY = "similar_in_category"  # the fallback when co-purchase data runs out
    TRENDING_LIVE = "trending_live"  # the online store's last 24 hours (alone or with the bundle)
    TRENDING = "trending"  # the bundle's trending table
    POPULAR = "popular"


@dataclass(frozen=True, slots=True)
class ListItem:
    item_id: str
    score: float
    source: ListSource


class TrendingSource(Protocol):
    def trending(self, hours: int, n: int, category: str | None = None) -> list[tuple[str, float]]: ...


class UnknownItemError(LookupError):
    """An item id neither the bundle nor the catalog knows."""

    def __init__(self, item_id: str) -> None:
        super().__init__(f"item {item_id!r} is not in the model or the catalog")
        self.item_id = item_id


class SimilarItems:
    """Cosine neighbours among the bundle's items: a normalized index, built once per bundle."""

    def __init__(self, item_factors: np.ndarray, *, flat_max_items: int = FLAT_MAX_ITEMS) -> None:
        faiss.omp_set_num_threads(1)  # built beside the requests a worker serves (see Recommender)
        vectors = np.ascontiguousarray(item_factors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1)
        self.placed = norms > MIN_NORM  # items with a factor vector: the rest have no cosine
        unit = np.ascontiguousarray(vectors / np.maximum(norms, MIN_NORM)[:, None], dtype=np.float32)
        self.index = build_item_index(unit, IndexParams(kind="flat" if len(unit) <= flat_max_items else "pq"))
        self.unit = unit

    def neighbours(self, item_idx: int, n: int, blocked: np.ndarray | None = None,
                   within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Up to `n` item indexes most like `item_idx` (cosine, best first), never the item itself, nor
        blocked ones; `within` (item indexes) restricts the search to those items, exactly."""
        vector = self.unit[item_idx : item_idx + 1]
        if within is not None:
            members = within[(within != item_idx) & self.placed[within]]
            if blocked is not None:
                members = members[~blocked[members]]
            scores = self.unit[members] @ vector[0]
            order = np.lexsort((members, -scores))[:n]
            return members[order], scores[order]
        total = self.index.ntotal
        skip = ~self.placed if blocked is None else blocked | ~self.placed
        k = min(total, n + 1 + 32)
        while True:
            scores, found = self.index.search(vector, k)
            keep = found[0] >= 0
            items, values = found[0][keep].astype(np.int64), scores[0][keep]
            good = (items != item_idx) & ~skip[items]
            if good.sum() >= n or k >= total:
                return items[good][:n], values[good][:n]
            k = min(total, k * 4)


class ItemLists:
    """Similar, bought-together and trending lists over one bundle and the live catalog."""

    def __init__(self, bundle: Bundle, catalog: Catalog | None = None,
                 similar: SimilarItems | None = None) -> None:
        self.bundle = bundle
        self.catalog = catalog if catalog is not None else Catalog(bundle)
        self.similar_items = similar if similar is not None else SimilarItems(bundle.item_factors)
        pop = bundle.popularity
        self._placed = self.similar_items.placed & (pop.popular > 0)  # the model has seen it
        self._trending = ranked(pop.trending, TRENDING_DEPTH)
        self._popular = ranked(pop.popular, TRENDING_DEPTH)

    @property
    def version(self) -> str:
        return self.bundle.version

    def _idx(self, item_id: str) -> int | None:
        if not self.catalog.knows(item_id):
            raise UnknownItemError(item_id)
        return self.catalog.index_of(item_id)

    def _ids(self, items: np.ndarray, scores: np.ndarray, source: ListSource) -> list[ListItem]:
        ids = self.bundle.items.ids
        return [ListItem(str(ids[i]), float(s), source) for i, s in zip(items.tolist(), scores.tolist(), strict=True)]

    def _content(self, item_id: str, n: int, taken: set[str]) -> list[ListItem]:
        found = self.catalog.content_neighbours(item_id, n + len(taken))
        return [ListItem(i, s, ListSource.CONTENT) for i, s in found if i not in taken][:n]

    def similar(self, item_id: str, n: int) -> list[ListItem]:
        """Cosine neighbours in stock; content neighbours for an item the model cannot place."""
        idx = self._idx(item_id)
        if idx is None or not self._placed[idx]:
            return self._content(item_id, n, set())
        items, scores = self.similar_items.neighbours(idx, n, ~self.catalog.in_stock | ~self._placed)
        out = self._ids(items, scores, ListSource.SIMILAR)
        if len(out) < n:  # a catalog too small or too sold out: top up by content
            out += self._content(item_id, n - len(out), {item_id, *(i.item_id for i in out)})
        return out

    def bought_together(self, item_id: str, n: int) -> list[ListItem]:
        """Co-purchase companions in stock, then cosine neighbours in the same category, then content."""
        idx = self._idx(item_id)
        out: list[ListItem] = []
        if idx is not None:
            matrix = self.bundle.bought_together
            row = slice(matrix.indptr[idx], matrix.indptr[idx + 1])
            companions, scores = matrix.indices[row].astype(np.int64), matrix.data[row]
            keep = self.catalog.in_stock[companions]
            companions, scores = companions[keep], scores[keep]
            order = np.lexsort((companions, -scores))[:n]
            out = self._ids(companions[order], scores[order], ListSource.BOUGHT_TOGETHER)
            if len(out) < n and self._placed[idx]:
                taken = np.zeros(len(self.catalog.in_stock), dtype=bool)
                taken[companions[order]] = True
                blocked = ~self.catalog.in_stock | ~self._placed | taken
                members = self.catalog.members(str(self.catalog.category[idx]))
                items, sims = self.similar_items.neighbours(idx, n - len(out), blocked, within=members)
                out += self._ids(items, sims, ListSource.SIMILAR_IN_CATEGORY)
        if len(out) < n:
            out += self._content(item_id, n - len(out), {item_id, *(i.item_id for i in out)})
        return out

    def trending(self, store: TrendingSource | None, n: int, category: str | None = None) -> list[ListItem]:
        """The store's last 24 hours fused by rank with the bundle's trending (then popular) table, in stock."""
        live = store.trending(TRENDING_HOURS, n + TRENDING_DEPTH // 10, category) if store is not None else []
        live_ids = [item_id for item_id, _ in live if self._sellable(item_id, category)]
        table = self._bundle_trending(category)
        fused: dict[str, float] = {}
        for rank, item_id in enumerate(live_ids):
            fused[item_id] = fused.get(item_id, 0.0) + 1.0 / (RRF_K + rank + 1)
        for rank, item_id in enumerate(table[: max(n, len(live_ids)) + n]):
            fused[item_id] = fused.get(item_id, 0.0) + 1.0 / (RRF_K + rank + 1)
        live_set = set(live_ids)
        best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        out = [ListItem(i, s, ListSource.TRENDING_LIVE if i in live_set else ListSource.TRENDING) for i, s in best]
        if len(out) < n:
            taken = {i.item_id for i in out}
            popular = self._bundle_list(self._popular, category)
            out += [ListItem(i, 0.0, ListSource.POPULAR) for i in popular if i not in taken][: n - len(out)]
        return out

    def _sellable(self, item_id: str, category: str | None) -> bool:
        meta = self.catalog.meta(item_id)
        if meta is None:  # events ahead of the catalog: stock unknown, category only from the store's key
            return True
        return meta.in_stock and (category is None or meta.category == category)

    def _bundle_trending(self, category: str | None) -> list[str]:
        if category is None:
            return self._bundle_list(self._trending, None)
        members = self.catalog.members(category)
        scores = self.bundle.popularity.trending[members]
        chosen = members[scores > 0]
        order = chosen[np.lexsort((chosen, -self.bundle.popularity.trending[chosen]))][:TRENDING_DEPTH]
        return self._bundle_list(order, None)

    def _bundle_list(self, items: np.ndarray, category: str | None) -> list[str]:
        keep = self.catalog.in_stock[items]
        if category is not None:
            keep &= self.catalog.category[items] == category
        return [str(i) for i in self.bundle.items.ids[items[keep]]]


_build_lock = threading.Lock()


def item_lists_for(holder: object, bundle: Bundle, catalog: Catalog | None = None,
                   build: Callable[[Bundle, Catalog | None], ItemLists] = ItemLists) -> ItemLists:
    """The `ItemLists` kept on `holder` (the app state) for this bundle, built on first use (once)."""
    current: ItemLists | None = getattr(holder, "item_lists", None)
    if current is not None and current.bundle is bundle:
        return current
    with _build_lock:
        current = getattr(holder, "item_lists", None)
        if current is None or current.bundle is not bundle:
            current = build(bundle, catalog)
            setattr(holder, "item_lists", current)  # noqa: B010
        return current

