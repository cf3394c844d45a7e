"""Candidate sources: each proposes (item, score) lists for users, the first stage of the recommender.

One small interface for every source (collaborative filtering, neighbours of recent history, the user's
own purchases, trending, trending in the user's categories, new arrivals). Only numpy and scipy: the
fitted arrays come from training, and serving runs the very same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from features.feed import Candidates, Source
from features.ranking import FEATURE_NAMES, SOURCE_FEATURES, pair_features
from features.social_state import community_of, friends_of, row_cells
from features.state import DAY, FeatureState, cell_values

RECENT_FOR_NEIGHBOURS = 20
NEW_ARRIVAL_DAYS = 14.0
TOP_CATEGORIES = 3
SHARED_DAYS = 30.0  # items shared to the user this recently are proposed ...
SHARED_HALF_LIFE_DAYS = 7.0  # ... newest first
FRIENDS_DAYS = 30.0  # friends' purchases this recent are proposed, weighted by recency ...
FRIENDS_HALF_LIFE_DAYS = 3.0  # ... halving every 3 days: people look at what a friend bought within days
FRIEND_SWAY_RANGE = (0.05, 3.0)  # ... and by the buyer's sway, kept in this range
COMMUNITY_DAYS = 14.0  # the community's activity this recent makes an item trend among them
RRF_K = 60.0  # reciprocal rank fusion constant: the candidate union's order without a ranker
SOURCE_ORDER: tuple[Source, ...] = tuple(Source(s) for s in SOURCE_FEATURES)


@dataclass(frozen=True, slots=True)
class CandidateModels:
    """Fitted arrays the sources score with; indexes follow the window's vocabularies."""

    als_users: np.ndarray
    als_items: np.ndarray
    bpr_users: np.ndarray
    bpr_items: np.ndarray
    item_neighbours: sp.csr_matrix  # items x items similarity (top neighbours per row)


def _top(
    scores: np.ndarray, k: int, blocked: np.ndarray | None, items: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Best `k` entries of `scores` (over `items` when given), skipping blocked items and -inf; ties at the
    k-th score go to the lower item idx, so the answer does not depend on which entries are passed."""
    ids = np.arange(len(scores)) if items is None else items
    keep = np.isfinite(scores)
    if blocked is not None:
        keep &= ~blocked[ids]
    ids, scores = ids[keep], scores[keep]
    if len(ids) > k:
        kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
        near = np.flatnonzero(scores >= kth)  # the best k and every entry tied with the k-th
        ids, scores = ids[near], scores[near]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].astype(np.int64), scores[order].astype(np.float32)


def factor_scores(users: np.ndarray, items: np.ndarray, user_idx: np.ndarray) -> np.ndarray:
    """Inner products of a chunk of users with every item (rows of -1 users are -inf)."""
    scores = np.full((len(user_idx), len(items)), -np.inf, dtype=np.float32)
    known = user_idx >= 0
    if known.any():
        scores[known] = users[user_idx[known]] @ items.T
    return scores


def top_scores(scores: np.ndarray, k: int, blocked: np.ndarray | None, items: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Best `k` items of a full score row (or of `items`, when `scores` holds only theirs), skipping blocked ones."""
    return _top(scores, k, blocked, items)


def neighbour_candidates(
    state: FeatureState, neighbours: sp.csr_matrix, user: int, k: int, blocked: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Items like the user's most recent ones: recency-weighted sum of neighbour similarities."""
    if user < 0:
        return _empty()
    items, last = _row(state.pair_last, user)
    if not len(items):
        return _empty()
    order = np.argsort(-last)[:RECENT_FOR_NEIGHBOURS]
    recent, last = items[order], last[order]
    weight = np.power(0.5, (state.cutoff_seconds - last) / DAY / 30.0)
    owner, cols, similarity = row_cells(neighbours, recent)  # the recent items' rows: cost independent of the catalog
    touched, position = np.unique(cols, return_inverse=True)
    scores = np.bincount(position, weights=similarity * weight[owner], minlength=len(touched))  # sums in input order
    keep = scores > 0
    return _top(scores[keep], k, blocked, touched[keep])


def _row(matrix: sp.csr_matrix, row: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored (columns, values) of one CSR row, in stored order, without building a matrix."""
    start, end = matrix.indptr[row], matrix.indptr[row + 1]
    return matrix.indices[start:end], matrix.data[start:end]


def repeat_candidates(
    state: FeatureState, user: int, k: int, blocked: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The user's own past purchases: bought more often and more recently first."""
    if user < 0:
        return _empty()
    items, purchases = _row(state.pair_purchases, user)
    if not len(items):
        return _empty()
    last = cell_values(state.pair_last, np.full(len(items), user), items)
    recency = np.power(0.5, np.clip(state.cutoff_seconds - last, 0, None) / DAY / 30.0)
    return _top(purchases * (1.0 + recency), k, blocked, items)


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)


def _decayed_sum(owner_weight: np.ndarray, cols: np.ndarray, seconds: np.ndarray, now: float, days: float,
                 half_life_days: float, k: int, blocked: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Items scored by the summed recency-decayed weight of the cells no older than `days`."""
    age = (now - seconds) / DAY
    fresh = (age >= 0) & (age <= days)
    if not fresh.any():
        return _empty()
    items, at = np.unique(cols[fresh], return_inverse=True)
    scores = np.bincount(at.ravel(), weights=owner_weight[fresh] * np.power(0.5, age[fresh] / half_life_days))
    return _top(scores, k, blocked, items)


def shared_candidates(state: FeatureState, user: int, k: int, blocked: np.ndarray | None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Items shared to the user in the last SHARED_DAYS: newest first, a share from an influencer higher."""
    if user < 0:
        return _empty()
    row = slice(state.pair_shared_last.indptr[user], state.pair_shared_last.indptr[user + 1])
    cols, seconds = state.pair_shared_last.indices[row].astype(np.int64), state.pair_shared_last.data[row]
    sharer = cell_values(state.pair_shared_by, np.full(len(cols), user), cols).astype(np.int64) - 1
    boost = 1.0 + np.log1p(np.where(sharer >= 0, state.social.influence[np.maximum(sharer, 0)], 0.0))
    return _decayed_sum(boost, cols, seconds, state.social_seconds, SHARED_DAYS, SHARED_HALF_LIFE_DAYS, k, blocked)


def friends_bought_candidates(state: FeatureState, user: int, k: int, blocked: np.ndarray | None
                              ) -> tuple[np.ndarray, np.ndarray]:
    """What the people the user sees bought in the last FRIENDS_DAYS: each buyer counts by their sway (a buyer
    whose shares nobody opens counts for little), a purchase of days ago much less than one of today."""
    friends = friends_of(state.user_sees, user)
    if not len(friends):
        return _empty()
    owner, cols, seconds = state.social.bought_cells(friends)
    sway = np.clip(state.social.sway[friends[owner]], *FRIEND_SWAY_RANGE)
    return _decayed_sum(sway, cols, seconds, state.social_seconds, FRIENDS_DAYS, FRIENDS_HALF_LIFE_DAYS, k, blocked)


def friends_trending_candidates(state: FeatureState, user: int, k: int, blocked: np.ndarray | None
                                ) -> tuple[np.ndarray, np.ndarray]:
    """Items most engaged with lately by the user's community: friends (1) and their friends (0.5)."""
    friends = friends_of(state.user_sees, user)
    if not len(friends):
        return _empty()
    people, weight = community_of(friends, state.social.sees)
    owner, cols, seconds = state.social.touched_cells(people)
    return _decayed_sum(weight[owner], cols, seconds, state.social_seconds, COMMUNITY_DAYS, 7.0, k, blocked)


@dataclass(frozen=True, slots=True)
class PopularLists:
    """Non-personal rankings as of the state's cut-off, computed once per window."""

    trending: np.ndarray  # item idx, best first
    by_category: Mapping[int, np.ndarray]  # category code -> item idx by trending, best first
    new_arrivals: np.ndarray  # items first seen in the last NEW_ARRIVAL_DAYS, by trending

    @classmethod
    def from_state(cls, state: FeatureState, depth: int = 500) -> PopularLists:
        score = state.item_trending + 1e-6 * state.item_buyers  # all-time buyers break ties
        order = np.lexsort((np.arange(len(score)), -score))
        order = order[score[order] > 0]
        categories = state.item_category[order]
        by_category = {int(c): order[categories == c][:depth] for c in np.unique(categories) if c >= 0}
        age = (state.cutoff_seconds - state.item_first_seen[order]) / DAY
        fresh = order[(age >= 0) & (age <= NEW_ARRIVAL_DAYS)]
        return cls(trending=order[:depth], by_category=by_category, new_arrivals=fresh[:depth])


def _listed(
    items: np.ndarray, scores_by_item: np.ndarray, k: int, blocked: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    if blocked is not None:
        items = items[~blocked[items]]
    items = items[:k]
    return items.astype(np.int64), scores_by_item[items].astype(np.float32)


def user_candidates(
    state: FeatureState,
    models: CandidateModels,
    lists: PopularLists,
    user: int,
    k: Mapping[Source, int],
    blocked: np.ndarray | None,
    factor_lists: Mapping[Source, tuple[np.ndarray, np.ndarray]],
) -> list[Candidates]:
    """Every source's list for one user; `factor_lists` carries the ALS / BPR results scored in batches."""
    out = [Candidates(source, *factor_lists[source]) for source in (Source.ALS, Source.BPR) if source in factor_lists]
    if k.get(Source.ITEM_KNN, 0):
        out.append(
            Candidates(
                Source.ITEM_KNN, *neighbour_candidates(state, models.item_neighbours, user, k[Source.ITEM_KNN], blocked)
            )
        )
    if k.get(Source.REPEAT, 0):
        out.append(Candidates(Source.REPEAT, *repeat_candidates(state, user, k[Source.REPEAT], blocked)))
    trending = state.item_trending
    if k.get(Source.CATEGORY_TRENDING, 0) and user >= 0:
        categories, share = _row(state.user_category, user)
        favourite = categories[np.argsort(-share)[:TOP_CATEGORIES]]
        pooled = [lists.by_category.get(int(c), np.empty(0, dtype=np.int64)) for c in favourite]
        items = np.concatenate(pooled) if pooled else np.empty(0, dtype=np.int64)
        items = items[np.argsort(-trending[items], kind="stable")] if len(items) else items
        out.append(
            Candidates(Source.CATEGORY_TRENDING, *_listed(items, trending, k[Source.CATEGORY_TRENDING], blocked))
        )
    if k.get(Source.NEW_ARRIVALS, 0):
        out.append(
            Candidates(Source.NEW_ARRIVALS, *_listed(lists.new_arrivals, trending, k[Source.NEW_ARRIVALS], blocked))
        )
    if k.get(Source.TRENDING, 0):
        out.append(Candidates(Source.TRENDING, *_listed(lists.trending, trending, k[Source.TRENDING], blocked)))
    for source, propose in ((Source.SHARED, shared_candidates), (Source.FRIENDS_BOUGHT, friends_bought_candidates),
                            (Source.FRIENDS_TRENDING, friends_trending_candidates)):
        if k.get(source, 0):
            out.append(Candidates(source, *propose(state, user, k[source], blocked)))
    return out


def merge_candidates(
    lists: list[Candidates], union_size: int
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Union of the sources' lists, cut to the `union_size` best by reciprocal rank fusion.

    Returns the union's items (best fused first, ties by item idx), each source's score and 1-based rank
    per union item (NaN where it did not propose it), the index in SOURCE_ORDER of the source that ranked
    the item highest (the earlier list on a tie), and the fused score. Array operations throughout: the
    sums run in list order, so the fused scores are the ones a per-item loop adds up.
    """
    sizes = [len(c.items) for c in lists]
    items_all = np.concatenate([c.items for c in lists]).astype(np.int64) if lists else np.empty(0, np.int64)
    rank_all = np.concatenate([np.arange(size) for size in sizes]) if lists else np.empty(0, np.int64)
    list_all = np.repeat(np.arange(len(lists)), sizes)
    unique, inverse = np.unique(items_all, return_inverse=True)
    fused = np.bincount(inverse, weights=1.0 / (RRF_K + rank_all + 1), minlength=len(unique))
    chosen = np.lexsort((unique, -fused))[:union_size]
    position = np.full(len(unique), -1, dtype=np.int64)
    position[chosen] = np.arange(len(chosen))
    best = np.lexsort((list_all, rank_all, inverse))  # per item: lowest rank, then earliest list, first
    heads = best[np.flatnonzero(np.diff(inverse[best], prepend=-1))]
    list_source = np.asarray([SOURCE_ORDER.index(c.source) for c in lists], dtype=np.int64)
    first = np.empty(len(unique), dtype=np.int64)
    first[inverse[heads]] = list_source[list_all[heads]]
    # per source (SOURCE_FEATURES order, as SOURCE_ORDER) x union item: the source's score and 1-based rank
    at = position[inverse]
    kept = at >= 0
    source_all = np.repeat(list_source, sizes)[kept]
    table = np.full((2, len(SOURCE_FEATURES), len(chosen)), np.nan, dtype=np.float32)
    if lists:
        table[0, source_all, at[kept]] = np.concatenate([c.scores for c in lists])[kept]
    table[1, source_all, at[kept]] = rank_all[kept] + 1
    scores = {name: table[0, j] for j, name in enumerate(SOURCE_FEATURES)}
    ranks = {name: table[1, j] for j, name in enumerate(SOURCE_FEATURES)}
    return unique[chosen], scores, ranks, first[chosen], fused[chosen].astype(np.float32)


def candidate_features(
    state: FeatureState,
    models: CandidateModels,
    rows_user: np.ndarray,
    items: np.ndarray,
    scores: dict[str, np.ndarray],
    ranks: dict[str, np.ndarray],
) -> np.ndarray:
    """Ranking features of candidate rows; every row gets the factor models' opinion, proposed or not."""
    if not len(items):
        return np.empty((0, len(FEATURE_NAMES)), dtype=np.float32)
    scores = dict(scores)
    known = rows_user >= 0
    for name, users_f, items_f in (
        ("als", models.als_users, models.als_items),
        ("bpr", models.bpr_users, models.bpr_items),
    ):
        full = np.full(len(items), np.nan, dtype=np.float32)
        full[known] = np.einsum("ij,ij->i", users_f[rows_user[known]], items_f[items[known]])
        scores[name] = full
    return pair_features(state, rows_user, items, scores, ranks)
