"""The state that ranking features are read from, computed as of a cut-off from the events before it.

Built once per training window (and once, as of "now", for the bundle that serving loads), so training
and serving read the same definitions. Nothing at or after the cut-off is ever looked at: the first
thing `build_state` does is drop those events.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.interactions import event_weights
from features.repurchase import NO_CATEGORY
from features.social_state import SocialView, build_social_fields
from features.vocab import Vocabulary
from features.weights import CONVERSION_TYPES

ITEM_WINDOWS_DAYS = (7, 30, 180)  # plus all time: item popularity over several windows
USER_EVENT_TYPES = ("view", "add_to_cart", "purchase", "share", "like", "refund")
DAY = 86_400.0
RECENT_BASKETS = 5  # "recently bought": in the user's last five purchase occasions
BASKET_DECAY = 0.8  # weight of an occasion n occasions before the user's last: BASKET_DECAY ** n
SOCIAL_GAP_DAYS = 1.0  # friends' windows end at the newest event when nothing happened for longer before the cut


@dataclass(frozen=True, slots=True)
class FeatureState:
    cutoff: pd.Timestamp  # features describe the world just before this moment
    # items (arrays indexed by item idx)
    item_window_counts: np.ndarray  # items x (windows + 1): positive events in the last 7/30/180 days, all time
    item_buyers: np.ndarray  # distinct buyers, all time
    item_trending: np.ndarray  # weights decayed with a 7-day half-life
    item_first_seen: np.ndarray  # epoch seconds of created_at, else of the first event; NaN if neither
    item_price: np.ndarray  # NaN when the catalog has none
    item_category: np.ndarray  # category code, -1 when missing
    item_brand: np.ndarray  # brand code, -1 when missing
    category_repurchase: np.ndarray  # per category code: share of buyer-item pairs bought again
    # users (arrays indexed by user idx)
    user_type_counts: np.ndarray  # users x USER_EVENT_TYPES
    user_median_price: np.ndarray  # median price of the user's purchased items; NaN if unknown
    user_last_seen: np.ndarray  # epoch seconds of the user's last event; NaN if none
    user_category: sp.csr_matrix  # users x categories: share of the user's positive weight
    user_brand: sp.csr_matrix  # users x brands: share of the user's positive weight
    user_category_last: sp.csr_matrix  # users x categories: epoch seconds of the last event there
    # purchase occasions ("baskets": distinct days with a purchase) and reorder timing
    item_repeat_buyers: np.ndarray  # buyers who bought the item on two or more occasions
    user_baskets: np.ndarray  # purchase occasions
    user_purchases: np.ndarray  # distinct (occasion, item) purchases, summed over occasions
    user_repeat_purchases: np.ndarray  # of those, purchases of an item bought on an earlier occasion
    user_first_purchase: np.ndarray  # epoch seconds of the first purchase; NaN if none
    user_last_purchase: np.ndarray  # epoch seconds of the last purchase; NaN if none
    # user-item pairs
    pair_last: sp.csr_matrix  # users x items: epoch seconds of the last positive event
    pair_purchases: sp.csr_matrix  # users x items: purchase count
    pair_weight: sp.csr_matrix  # users x items: summed weights (floored at 0)
    pair_baskets: sp.csr_matrix  # users x items: occasions the item was bought on
    pair_first_basket: sp.csr_matrix  # users x items: 1-based ordinal of the user's first occasion with it
    pair_last_basket: sp.csr_matrix  # users x items: 1-based ordinal of the last occasion with it
    pair_first_purchase: sp.csr_matrix  # users x items: epoch seconds of the first purchase
    pair_last_purchase: sp.csr_matrix  # users x items: epoch seconds of the last purchase
    pair_recent_baskets: sp.csr_matrix  # users x items: of the user's last RECENT_BASKETS occasions, how many
    pair_basket_decay: sp.csr_matrix  # users x items: occasions with the item, weighted BASKET_DECAY ** age
    # social (features.social_state): friends, shares to the user, everyone's rows for reading friends'
    item_share_rate: np.ndarray  # shares per view; NaN when neither
    item_referral_rate: np.ndarray  # referred purchases per referred view; NaN when never referred
    user_sees: sp.csr_matrix  # users x users: whose activity the user sees (friends, followed, sharers to them)
    pair_shared_last: sp.csr_matrix  # users x items: epoch seconds of the last share of the item TO the user
    pair_shared_by: sp.csr_matrix  # users x items: 1 + user idx of that last sharer
    social: SocialView  # not per user: a one-user view keeps everyone's rows to read the friends'

    @property
    def cutoff_seconds(self) -> float:
        return float(self.cutoff.value) / 1e9

    @property
    def social_seconds(self) -> float:
        """Where friends' activity windows end: the cut-off, unless the newest event in everyone's rows is over
        SOCIAL_GAP_DAYS older, then that event. On bucketed data (every event at its bucket's start, the
        cut-off at the next bucket's) this keeps the latest bucket inside "the last days" instead of half a
        year behind them; on continuous or daily data nothing changes."""
        newest = self.social.newest
        if np.isfinite(newest) and newest < self.cutoff_seconds - SOCIAL_GAP_DAYS * DAY:
            return newest
        return self.cutoff_seconds


def cell_values(matrix: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """matrix[rows[k], cols[k]] for every k, 0 where the cell is empty or an index is -1."""
    if len(rows):
        user = int(rows[0])
        if user >= 0 and (rows == user).all():  # one row's cells (a request's candidates): a binary search
            found = _row_cells(matrix, user, cols)
            if found is not None:
                return found
    out = np.zeros(len(rows), dtype=np.float64)
    ok = (rows >= 0) & (cols >= 0)
    if ok.any():
        out[ok] = np.asarray(matrix[rows[ok], cols[ok]]).ravel()
    return out


def _row_cells(matrix: sp.csr_matrix, row: int, cols: np.ndarray) -> np.ndarray | None:
    """matrix[row, cols] (0 for an empty cell or a column of -1) by binary search in the row's columns,
    without the fixed cost of scipy's fancy indexing; None when the row repeats a column (scipy sums those)."""
    start, end = int(matrix.indptr[row]), int(matrix.indptr[row + 1])
    if end == start:
        return np.zeros(len(cols))
    stored, values = matrix.indices[start:end], matrix.data[start:end]
    if not matrix.has_canonical_format:
        order = np.argsort(stored, kind="stable")
        stored, values = stored[order], values[order]
        if (stored[1:] == stored[:-1]).any():
            return None
    at = np.minimum(np.searchsorted(stored, cols), end - start - 1)
    return np.where(stored[at] == cols, values[at].astype(np.float64, copy=False), 0.0)


def _codes(values: pd.Series, vocabulary: list[str]) -> np.ndarray:
    index = {v: i for i, v in enumerate(vocabulary)}
    return np.fromiter((index.get(v, -1) for v in values.fillna(NO_CATEGORY)), dtype=np.int64, count=len(values))


def _sparse(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int], how: str) -> sp.csr_matrix:
    """Aggregate (row, col, value) triples by sum, min or max into a CSR matrix (values must not be 0)."""
    if how == "sum":
        matrix = sp.csr_matrix((values.astype(np.float64), (rows, cols)), shape=shape)
        matrix.sum_duplicates()
        return matrix
    frame = pd.DataFrame({"r": rows, "c": cols, "v": values}).groupby(["r", "c"], sort=False)["v"].agg(how)
    r = frame.index.get_level_values(0).to_numpy()
    c = frame.index.get_level_values(1).to_numpy()
    return sp.csr_matrix((frame.to_numpy(dtype=np.float64), (r, c)), shape=shape)


@dataclass(frozen=True, slots=True)
class _Occasions:
    """Purchases grouped into occasions: one row per (user, item, day) with the day's ordinal per user."""

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray  # the first purchase time of the pair that day
    ordinal: np.ndarray  # 1-based: the user's n-th purchase day


def _occasions(user: np.ndarray, item: np.ndarray, ts: np.ndarray) -> _Occasions:
    if not len(user):
        empty = np.empty(0, dtype=np.int64)
        return _Occasions(empty, empty, np.empty(0), np.empty(0))
    day = np.floor(ts / DAY).astype(np.int64)
    span = int(day.max() - day.min()) + 1
    user_day, line_key = np.unique(user.astype(np.int64) * span + (day - day.min()), return_inverse=True)
    day_user = user_day // span
    ordinal = np.arange(len(user_day)) - np.searchsorted(day_user, day_user, side="left") + 1
    lines = pd.DataFrame({"u": user, "i": item, "o": ordinal[line_key.ravel()], "t": ts})
    lines = lines.groupby(["u", "i", "o"], sort=True)["t"].min().reset_index()
    return _Occasions(
        lines["u"].to_numpy(np.int64),
        lines["i"].to_numpy(np.int64),
        lines["t"].to_numpy(np.float64),
        lines["o"].to_numpy(np.float64),
    )


def build_state(
    events: pd.DataFrame,
    users: Vocabulary,
    items: Vocabulary,
    item_meta: pd.DataFrame,
    weights: dict[str, float],
    cutoff: pd.Timestamp,
    categories: list[str],
    brands: list[str],
    social: pd.DataFrame | None = None,
) -> FeatureState:
    """Every aggregate from events strictly before `cutoff`; `item_meta` rows follow item idx.

    `social` is the optional friend / follow table; shares and referrals before the cut-off add ties.
    """
    past = events.loc[events["ts"] < cutoff]
    now_s = float(cutoff.value) / 1e9
    u = users.indexes(past["user_id"])
    i = items.indexes(past["item_id"])
    known = (u >= 0) & (i >= 0)
    past, u, i = past.loc[known], u[known], i[known]
    w = event_weights(past, weights).astype(np.float64)
    ts = past["ts"].astype("int64").to_numpy() / 1e9
    age = (now_s - ts) / DAY
    positive = w > 0
    n_users, n_items = len(users), len(items)

    windows = [np.bincount(i[positive & (age <= d)], minlength=n_items) for d in ITEM_WINDOWS_DAYS]
    windows.append(np.bincount(i[positive], minlength=n_items))
    bought = past["event_type"].isin(CONVERSION_TYPES).to_numpy()
    buyer_pairs = pd.DataFrame({"u": u[bought], "i": i[bought]}).drop_duplicates()
    trending = np.bincount(i[positive], weights=w[positive] * np.power(0.5, age[positive] / 7.0), minlength=n_items)

    first_event = np.full(n_items, np.nan)
    order = np.argsort(ts, kind="stable")
    first_idx, first_pos = np.unique(i[order], return_index=True)
    first_event[first_idx] = ts[order][first_pos]
    created = pd.to_datetime(item_meta["created_at"], utc=True)
    created_ns = created.dt.tz_convert(None).to_numpy().astype("datetime64[ns]").astype("int64")
    created_s = np.where(created.notna().to_numpy(), created_ns / 1e9, np.nan)
    first_seen = np.where(np.isnan(created_s), first_event, created_s)
    first_seen = np.where(first_seen > now_s, np.nan, first_seen)  # not yet created as of the cut-off

    category = _codes(item_meta["category"].astype(object), categories)
    brand = _codes(item_meta["brand"].astype(object), brands)
    price = item_meta["price"].to_numpy(dtype=np.float64)

    purchase_counts = _sparse(u[bought], i[bought], np.ones(bought.sum()), (n_users, n_items), "sum")
    rebought = purchase_counts.copy()
    rebought.data = (rebought.data > 1).astype(np.float64)
    pair_cat = category[purchase_counts.indices]
    n_cat = max(len(categories), 1)
    pairs_per_cat = np.bincount(pair_cat[pair_cat >= 0], minlength=n_cat).astype(np.float64)
    again_per_cat = np.bincount(pair_cat[pair_cat >= 0], weights=rebought.data[pair_cat >= 0], minlength=n_cat)
    category_repurchase = np.divide(again_per_cat, pairs_per_cat, out=np.full(n_cat, np.nan), where=pairs_per_cat > 0)

    type_counts = np.zeros((n_users, len(USER_EVENT_TYPES)), dtype=np.float32)
    kinds = past["event_type"].to_numpy()
    for column, kind in enumerate(USER_EVENT_TYPES):
        mask = kinds == kind
        type_counts[:, column] = np.bincount(u[mask], minlength=n_users)

    paid = price[i[bought]]
    paid_frame = pd.DataFrame({"u": u[bought], "p": paid}).dropna()
    median_price = np.full(n_users, np.nan)
    if len(paid_frame):
        medians = paid_frame.groupby("u")["p"].median()
        median_price[medians.index.to_numpy()] = medians.to_numpy()
    last_seen = np.full(n_users, np.nan)
    if len(u):
        latest = pd.Series(ts).groupby(u).max()
        last_seen[latest.index.to_numpy()] = latest.to_numpy()

    def shares(codes: np.ndarray, width: int) -> sp.csr_matrix:
        ok = positive & (codes[i] >= 0)
        matrix = _sparse(u[ok], codes[i][ok], w[ok], (n_users, max(width, 1)), "sum")
        totals = np.asarray(matrix.sum(axis=1)).ravel()
        scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
        return sp.csr_matrix(sp.diags(scale) @ matrix)

    occasions = _occasions(u[bought], i[bought], ts[bought])
    shape = (n_users, n_items)
    ou, oi = occasions.user, occasions.item
    pair_baskets = _sparse(ou, oi, np.ones(len(ou)), shape, "sum")
    pair_first_basket = _sparse(ou, oi, occasions.ordinal, shape, "min")
    repeat_line = occasions.ordinal > cell_values(pair_first_basket, ou, oi)  # bought on an earlier occasion
    user_baskets = np.zeros(n_users)
    np.maximum.at(user_baskets, ou, occasions.ordinal)
    first_purchase = np.full(n_users, np.nan)
    last_purchase = np.full(n_users, np.nan)
    if len(ou):
        per_user = pd.Series(occasions.ts).groupby(ou)
        first_purchase[per_user.min().index.to_numpy()] = per_user.min().to_numpy()
        last_purchase[per_user.max().index.to_numpy()] = per_user.max().to_numpy()
    repeat_buyer_items = pair_baskets.indices[pair_baskets.data >= 2]
    baskets_ago = user_baskets[ou] - occasions.ordinal  # 0: the user's last occasion
    recent = baskets_ago < RECENT_BASKETS

    has_cat = category[i] >= 0
    pair_last = _sparse(u[positive], i[positive], ts[positive], (n_users, n_items), "max")
    pair_last_purchase = _sparse(ou, oi, occasions.ts, shape, "max")
    friends = build_social_fields(past, u, i, ts, users, items, social, cutoff)
    return FeatureState(
        cutoff=cutoff,
        item_window_counts=np.stack(windows, axis=1).astype(np.float32),
        item_buyers=np.bincount(buyer_pairs["i"].to_numpy(), minlength=n_items).astype(np.float32),
        item_trending=trending.astype(np.float32),
        item_first_seen=first_seen,
        item_price=price,
        item_category=category,
        item_brand=brand,
        category_repurchase=category_repurchase,
        user_type_counts=type_counts,
        user_median_price=median_price,
        user_last_seen=last_seen,
        user_category=shares(category, len(categories)),
        user_brand=shares(brand, len(brands)),
        user_category_last=_sparse(u[has_cat], category[i][has_cat], ts[has_cat], (n_users, n_cat), "max"),
        item_repeat_buyers=np.bincount(repeat_buyer_items, minlength=n_items).astype(np.float32),
        user_baskets=user_baskets.astype(np.float32),
        user_purchases=np.bincount(ou, minlength=n_users).astype(np.float32),
        user_repeat_purchases=np.bincount(ou, weights=repeat_line, minlength=n_users).astype(np.float32),
        user_first_purchase=first_purchase,
        user_last_purchase=last_purchase,
        pair_last=pair_last,
        pair_purchases=purchase_counts,
        pair_weight=_sparse(u, i, w, (n_users, n_items), "sum").maximum(0).tocsr(),
        pair_baskets=pair_baskets,
        pair_first_basket=pair_first_basket,
        pair_last_basket=_sparse(ou, oi, occasions.ordinal, shape, "max"),
        pair_first_purchase=_sparse(ou, oi, occasions.ts, shape, "min"),
        pair_last_purchase=pair_last_purchase,
        pair_recent_baskets=_sparse(ou[recent], oi[recent], np.ones(int(recent.sum())), shape, "sum"),
        pair_basket_decay=_sparse(ou, oi, np.power(BASKET_DECAY, baskets_ago), shape, "sum"),
        item_share_rate=friends.item_share_rate,
        item_referral_rate=friends.item_referral_rate,
        user_sees=friends.user_sees,
        pair_shared_last=friends.pair_shared_last,
        pair_shared_by=friends.pair_shared_by,
        social=SocialView.of(pair_last, pair_last_purchase, friends.shared, friends.influence, friends.sway,
                              friends.user_sees),
    )


_SPARSE_FIELDS = (
    "user_category",
    "user_brand",
    "user_category_last",
    "pair_last",
    "pair_purchases",
    "pair_weight",
    "pair_baskets",
    "pair_first_basket",
    "pair_last_basket",
    "pair_first_purchase",
    "pair_last_purchase",
    "pair_recent_baskets",
    "pair_basket_decay",
    "user_sees",
    "pair_shared_last",
    "pair_shared_by",
)


def save_state(state: FeatureState, directory: Path) -> list[Path]:
    """Write the state as `state.npz` (dense arrays and the cut-off) plus one file per sparse matrix."""
    dense = {
        f.name: getattr(state, f.name)
        for f in fields(state)
        if f.name not in _SPARSE_FIELDS and f.name not in ("cutoff", "social")
    }
    dense["cutoff_ns"] = np.asarray([state.cutoff.value], dtype=np.int64)
    dense["social_influence"] = state.social.influence
    dense["social_sway"] = state.social.sway
    written = [directory / "state.npz"]
    np.savez(written[0], allow_pickle=False, **dense)
    for name in _SPARSE_FIELDS:
        path = directory / f"state_{name}.npz"
        sp.save_npz(path, getattr(state, name).tocsr(), compressed=False)
        written.append(path)
    path = directory / "state_social_shared.npz"  # the social view's other rows are the pair fields above
    sp.save_npz(path, state.social.shared.tocsr(), compressed=False)
    written.append(path)
    return written


def load_state(directory: Path) -> FeatureState:
    with np.load(directory / "state.npz", allow_pickle=False) as dense:
        values: dict[str, object] = {
            name: dense[name] for name in dense.files if name not in ("cutoff_ns", "social_influence", "social_sway")
        }
        values["cutoff"] = pd.Timestamp(int(dense["cutoff_ns"][0]), unit="ns", tz="UTC")
        influence, sway = dense["social_influence"], dense["social_sway"]
    for name in _SPARSE_FIELDS:
        values[name] = sp.load_npz(directory / f"state_{name}.npz").tocsr()
    shared = sp.load_npz(directory / "state_social_shared.npz").tocsr()
    values["social"] = SocialView.of(values["pair_last"], values["pair_last_purchase"],
                                     shared, influence, sway, values["user_sees"])
    return FeatureState(**values)  # type: ignore[arg-type]
