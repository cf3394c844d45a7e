"""Ranking features for (user, item) candidate pairs, read from a `FeatureState`.

The one definition used to build the ranker's training rows and, in serving, the rows it scores; the
order of `FEATURE_NAMES` is pinned in the bundle. Missing values stay NaN (LightGBM treats them as
missing), each with an explicit indicator where absence itself means something.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from features.social_state import friend_activity
from features.state import DAY, ITEM_WINDOWS_DAYS, RECENT_BASKETS, USER_EVENT_TYPES, FeatureState, cell_values

SOCIAL_SOURCES = ("shared", "friends_bought", "friends_trending")
SOURCE_FEATURES = ("als", "bpr", "item_knn", "repeat", "trending", "category_trending", "new_arrivals",
                   *SOCIAL_SOURCES)
FRIEND_WINDOWS_DAYS = (1, 3, 7, 30)  # plus all time; friends notice a purchase within days
# Read from the people the user sees, as of the cut-off ("viewed": any positive event, a view or more).
SOCIAL_FEATURES: tuple[str, ...] = (
    *(f"friends_bought_{d}d" for d in FRIEND_WINDOWS_DAYS),
    "friends_bought_all",
    "friends_bought_days",  # days since the newest purchase of the item by someone the user sees; NaN if none
    "friends_bought_sway_7d",  # those buyers of the last 7 days, each weighted by how much people act on them
    *(f"friends_shared_{d}d" for d in FRIEND_WINDOWS_DAYS),
    "friends_shared_all",
    *(f"friends_viewed_{d}d" for d in FRIEND_WINDOWS_DAYS),
    "friends_viewed_all",
    "user_friends",
    "pair_shared_days",  # days since the item was last shared to the user; NaN if never
    "pair_sharer_influence",  # influence of that last sharer (attribution as of the cut-off)
    "pair_sharer_sway",  # how often people open that sharer's shares, over the usual rate
    "item_share_rate",
    "item_referral_rate",
)

FEATURE_NAMES: tuple[str, ...] = (
    *(f"{s}_score" for s in SOURCE_FEATURES),
    *(f"{s}_rank" for s in SOURCE_FEATURES),
    "n_sources",
    *(f"item_events_{d}d" for d in ITEM_WINDOWS_DAYS),
    "item_events_all",
    "item_buyers_all",
    "item_trending",
    "item_age_days",
    "item_price_missing",
    "price_to_user_median",
    "user_category_affinity",
    "user_brand_affinity",
    *(f"user_{t}s_all" for t in USER_EVENT_TYPES),
    "user_days_since_last_event",
    "pair_days_since_last_event",
    "pair_purchases_all",
    "pair_weight_all",
    "category_days_since_last_event",
    "category_repurchase_rate",
    # reorder timing: purchase occasions ("baskets") and the intervals between them
    "item_reorder_rate",
    "user_baskets_all",
    "user_basket_size",
    "user_repeat_share",
    "user_basket_gap_days",
    "user_days_since_last_basket",
    "user_basket_due_ratio",
    "pair_baskets_all",
    "pair_basket_share",
    "pair_basket_share_since_first",
    "pair_baskets_since_last",
    "pair_interval_days",
    "pair_days_since_purchase",
    "pair_due_ratio",
    "pair_recent_basket_share",
    "pair_basket_decay",
    *SOCIAL_FEATURES,
)
# Every column the social ablation blanks: the social features and the social sources' scores and ranks.
SOCIAL_COLUMNS: tuple[str, ...] = (
    *(f"{s}_{kind}" for s in SOCIAL_SOURCES for kind in ("score", "rank")),
    *SOCIAL_FEATURES,
)


def pair_features(
    state: FeatureState,
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    source_scores: Mapping[str, np.ndarray],
    source_ranks: Mapping[str, np.ndarray],
) -> np.ndarray:
    """A float32 matrix, one row per pair, columns in FEATURE_NAMES order.

    `user_idx` may hold -1 for users the state does not know (their user features are NaN or 0).
    `source_scores` / `source_ranks` give each candidate source's score and rank per pair (NaN where the
    source did not propose the item). Columns are written straight into the float32 matrix (the values a
    float64 column would round to), blocks of columns at once where they come from one array.
    """
    n = len(item_idx)
    now = state.cutoff_seconds
    known = user_idx >= 0
    u = np.where(known, user_idx, 0)
    out = _Columns(n)
    missing = np.full(n, np.nan)
    out.put(*(source_scores.get(name, missing) for name in SOURCE_FEATURES))
    ranks = out.put(*(source_ranks.get(name, missing) for name in SOURCE_FEATURES))
    out.put(np.count_nonzero(~np.isnan(ranks), axis=1))
    out.put(state.item_window_counts[item_idx])
    price = state.item_price[item_idx]
    out.put(state.item_buyers[item_idx], state.item_trending[item_idx], (now - state.item_first_seen[item_idx]) / DAY,
            np.isnan(price))
    median = np.where(known, state.user_median_price[u], np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        out.put(np.where(median > 0, price / median, np.nan))
    category = state.item_category[item_idx]
    rows = np.where(known, user_idx, -1)
    out.put(cell_values(state.user_category, rows, category),
            cell_values(state.user_brand, rows, state.item_brand[item_idx]),
            np.where(known[:, None], state.user_type_counts[u], 0.0),
            np.where(known, (now - state.user_last_seen[u]) / DAY, np.nan))
    last = cell_values(state.pair_last, rows, item_idx)
    category_last = cell_values(state.user_category_last, rows, category)
    out.put(np.where(last > 0, (now - last) / DAY, np.nan),
            cell_values(state.pair_purchases, rows, item_idx),
            cell_values(state.pair_weight, rows, item_idx),
            np.where(category_last > 0, (now - category_last) / DAY, np.nan),
            np.where(category >= 0, state.category_repurchase[np.maximum(category, 0)], np.nan))
    out.put(*_reorder_timing(state, rows, item_idx))
    out.put(*_social(state, rows, item_idx))
    return out.done()


class _Columns:
    """The feature matrix, filled left to right: 1-d arrays are one column, 2-d arrays several."""

    __slots__ = ("at", "matrix")

    def __init__(self, rows: int) -> None:
        self.matrix = np.empty((rows, len(FEATURE_NAMES)), dtype=np.float32)
        self.at = 0

    def put(self, *values: np.ndarray) -> np.ndarray:
        """Write `values` as the next columns; returns the part of the matrix they fill."""
        start = self.at
        for value in values:
            width = 1 if value.ndim == 1 else value.shape[1]
            self.matrix[:, self.at : self.at + width] = value.reshape(len(value), width)
            self.at += width
        return self.matrix[:, start : self.at]

    def done(self) -> np.ndarray:
        assert self.at == len(FEATURE_NAMES)
        return self.matrix


def _ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bottom > 0, top / bottom, np.nan)


def _reorder_timing(state: FeatureState, rows: np.ndarray, item_idx: np.ndarray) -> list[np.ndarray]:
    """When the user shops and whether this item is due: occasions, shares and intervals (NaN if unknown)."""
    now = state.cutoff_seconds
    known = rows >= 0
    u = np.maximum(rows, 0)
    baskets = np.where(known, state.user_baskets[u], 0.0)
    first = np.where(known, state.user_first_purchase[u], np.nan)
    last = np.where(known, state.user_last_purchase[u], np.nan)
    user_gap = _ratio((last - first) / DAY, baskets - 1)
    since_basket = (now - last) / DAY
    pair_baskets = cell_values(state.pair_baskets, rows, item_idx)
    first_basket = cell_values(state.pair_first_basket, rows, item_idx)
    last_basket = cell_values(state.pair_last_basket, rows, item_idx)
    first_bought = cell_values(state.pair_first_purchase, rows, item_idx)
    last_bought = cell_values(state.pair_last_purchase, rows, item_idx)
    bought = pair_baskets > 0
    pair_gap = _ratio((last_bought - first_bought) / DAY, pair_baskets - 1)
    since_bought = np.where(bought, (now - last_bought) / DAY, np.nan)
    return [
        _ratio(state.item_repeat_buyers[item_idx], state.item_buyers[item_idx]),
        baskets,
        _ratio(np.where(known, state.user_purchases[u], 0.0), baskets),
        _ratio(np.where(known, state.user_repeat_purchases[u], 0.0), np.where(known, state.user_purchases[u], 0.0)),
        user_gap,
        since_basket,
        _ratio(since_basket, user_gap),
        pair_baskets,
        _ratio(pair_baskets, baskets),
        np.where(bought, _ratio(pair_baskets, baskets - first_basket + 1), np.nan),
        np.where(bought, baskets - last_basket, np.nan),
        pair_gap,
        since_bought,
        _ratio(since_bought, pair_gap),
        _ratio(cell_values(state.pair_recent_baskets, rows, item_idx), np.minimum(baskets, RECENT_BASKETS)),
        cell_values(state.pair_basket_decay, rows, item_idx),
    ]


def _social(state: FeatureState, rows: np.ndarray, item_idx: np.ndarray) -> list[np.ndarray]:
    """Friends' purchases, shares and views of the item in windows; the last share of it to the user."""
    now = state.social_seconds
    since = (*(now - d * DAY for d in FRIEND_WINDOWS_DAYS), -np.inf)
    social = state.social
    readers = (social.bought_cells, social.shared_cells, social.touched_cells)
    bought, shared, touched = friend_activity(state.user_sees, readers, rows, item_idx, since, [social.sway])
    week = FRIEND_WINDOWS_DAYS.index(7)
    columns = [bought.counts,
               np.where(bought.latest > 0, (now - bought.latest) / DAY, np.nan),
               bought.weighted[:, week],
               shared.counts, touched.counts]
    known = rows >= 0
    indptr = state.user_sees.indptr
    at = np.maximum(rows, 0)
    columns.append(np.where(known, indptr[at + 1] - indptr[at], 0.0))  # people the user sees
    shared_last = cell_values(state.pair_shared_last, rows, item_idx)
    columns.append(np.where(shared_last > 0, (now - shared_last) / DAY, np.nan))
    sharer = cell_values(state.pair_shared_by, rows, item_idx).astype(np.int64) - 1
    for per_user in (social.influence, social.sway):
        columns.append(np.where(sharer >= 0, per_user[np.clip(sharer, 0, max(len(per_user) - 1, 0))]
                                if len(per_user) else np.nan, np.nan))
    columns.append(state.item_share_rate[item_idx])
    columns.append(state.item_referral_rate[item_idx])
    return columns
