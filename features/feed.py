"""Composing a feed from ranked candidate lists: the one definition of the fallback chain.

Sources are tried in order; each contributes its best items that are not blocked (already bought, excluded,
filtered) and not already taken, until the feed holds `n`. Serving and offline evaluation both call this,
so what is measured is what is served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Source(StrEnum):
    """Where an item in a feed came from; the order of the fallback chain (DESIGN)."""

    ALS = "als"
    BPR = "bpr"
    ITEM_KNN = "item_knn"
    EASE = "ease"  # EASE item weights over the user's history (a served single source, not a ranker candidate)
    REPEAT = "repeat"
    CATEGORY_TRENDING = "category_trending"  # trending in the user's favourite categories
    NEW_ARRIVALS = "new_arrivals"
    SHARED = "shared"  # shared to the user recently
    FRIENDS_BOUGHT = "friends_bought"  # recent purchases of the people the user sees
    FRIENDS_TRENDING = "friends_trending"  # trending among the user's friends and their friends
    FUSED = "fused"  # a blend of single sources (features.served.fuse); each item names the part that led it
    FOLD_IN = "fold_in"
    NEIGHBOURS = "neighbours"
    TRENDING_CATEGORY = "trending_category"  # trending in the category the caller asked for
    TRENDING = "trending"
    POPULAR = "popular"
    PINNED = "pinned"  # placed by a merchandising rule, not by a model


@dataclass(frozen=True, slots=True)
class Candidates:
    source: Source
    items: np.ndarray  # item idx, best first
    scores: np.ndarray  # same length, the source's own score
    item_sources: tuple[Source, ...] | None = None  # per item, when a ranked union mixes sources

    def source_of(self, position: int) -> Source:
        return self.item_sources[position] if self.item_sources is not None else self.source


@dataclass(frozen=True, slots=True)
class Feed:
    items: np.ndarray  # item idx, best first
    scores: np.ndarray
    sources: tuple[Source, ...]  # per item, its source (within a ranked union, the source that proposed it)
    steps: tuple[Source, ...]  # per item, the step of the chain it came from

    @property
    def step(self) -> Source | None:
        """The step of the chain that answered first (the feed's main source)."""
        return self.steps[0] if self.steps else None


def compose_feed(chain: Sequence[Candidates], n: int, blocked: np.ndarray | None = None) -> Feed:
    """Take up to `n` items along the chain, skipping blocked (bool mask per item idx) and repeated ones."""
    taken: list[int] = []
    scores: list[float] = []
    sources: list[Source] = []
    steps: list[Source] = []
    seen: set[int] = set()
    for candidates in chain:
        if len(taken) >= n:
            break
        items = candidates.items
        positions = np.arange(len(items))
        if blocked is not None and len(items):
            positions = positions[~blocked[items]]
        for position in positions.tolist():
            idx = int(items[position])
            if idx in seen:
                continue
            seen.add(idx)
            taken.append(idx)
            scores.append(float(candidates.scores[position]))
            sources.append(candidates.source_of(position))
            steps.append(candidates.source)
            if len(taken) >= n:
                break
    return Feed(np.asarray(taken, dtype=np.int64), np.asarray(scores, dtype=np.float32), tuple(sources),
                tuple(steps))


def interleave(primary: Candidates, secondary: Candidates, every: int, limit: int) -> Candidates:
    """`primary` with one item of `secondary` after each `every - 1` of its own, at most `limit` of them.

    How a session's fresh intent (items like the ones just viewed) gets seats in a feed the long-term
    ranker orders: the ranked order is kept, the session's picks are placed, repeats are skipped.
    """
    items: list[int] = []
    scores: list[float] = []
    sources: list[Source] = []
    seen: set[int] = set()

    def take(candidates: Candidates, position: int) -> bool:
        idx = int(candidates.items[position])
        if idx in seen:
            return False
        seen.add(idx)
        items.append(idx)
        scores.append(float(candidates.scores[position]))
        sources.append(candidates.source_of(position))
        return True

    extra = iter(range(min(max(limit, 0), len(secondary.items))))
    for position in range(len(primary.items)):
        if len(items) % every == every - 1:
            any(take(secondary, k) for k in extra)  # the next session pick not already placed
        take(primary, position)
    return Candidates(primary.source, np.asarray(items, dtype=np.int64), np.asarray(scores, dtype=np.float32),
                      tuple(sources))
