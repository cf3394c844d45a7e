"""The online form of the ranking features: one user's rows of a `FeatureState`, brought up to date with
the events the service received since the bundle was trained.

`user_view` returns a `FeatureState` with a single user (row 0) that shares every item array with the
bundle's state, so candidate sources and `pair_features` run unchanged on it — the same definitions as
in training, read one request later. User and pair aggregates are updated from the new events by the
rule of each aggregate (counts add, "last time" takes the maximum, affinity shares are re-weighted);
an aggregate without an online rule keeps its value as of the bundle's cut-off.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.social_state import OnlineCells, newest_per_key
from features.state import USER_EVENT_TYPES, FeatureState, build_state
from features.vocab import Vocabulary
from features.weights import CONVERSION_TYPES

_USER_PREFIXES = ("user_", "pair_")


@dataclass(frozen=True, slots=True)
class SocialUpdates:
    """What reached a user from others since the bundle: shares to them, their friends' purchases. Indexes
    are the bundle's (-1: an item or sharer it lacks); times are epoch seconds."""

    share_items: np.ndarray
    sharers: np.ndarray
    share_ts: np.ndarray
    friends: np.ndarray  # one entry per purchase
    friend_items: np.ndarray
    friend_ts: np.ndarray
    # people the user sees since the bundle (who shared with them, who referred them): a rebuilt graph holds these
    ties: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    friend_shares: OnlineCells | None = None  # what friends shared (to anyone): friend, item, time


def _user_fields(state: FeatureState) -> list[str]:
    return [f.name for f in fields(state) if f.name.startswith(_USER_PREFIXES)]


def blank_user_rows(state: FeatureState, categories: list[str], brands: list[str]) -> dict[str, Any]:
    """The rows a user without any event gets, as `build_state` defines them (computed once per bundle)."""
    meta = pd.DataFrame({"created_at": pd.Series([], dtype="datetime64[ns, UTC]"), "category": [], "brand": [],
                         "price": pd.Series([], dtype="float64")})
    events = pd.DataFrame({"user_id": pd.Series([], dtype="str"), "item_id": pd.Series([], dtype="str"),
                           "event_type": pd.Series([], dtype="str"),
                           "ts": pd.Series([], dtype="datetime64[ns, UTC]")})
    empty = build_state(events, Vocabulary.from_ids(["-"]), Vocabulary.from_ids([]), meta, {}, state.cutoff,
                        categories, brands)
    rows: dict[str, Any] = {}
    for name in _user_fields(state):
        value = getattr(state, name)
        if sp.issparse(value):
            rows[name] = sp.csr_matrix((1, value.shape[1]), dtype=value.dtype)
        else:
            rows[name] = np.asarray(getattr(empty, name))[:1].copy()
    return rows


def _row(value: Any, user: int) -> Any:
    if sp.issparse(value):  # a copy of the CSR row, built from its slice of the arrays (scipy's slicing costs more)
        start, end = value.indptr[user], value.indptr[user + 1]
        return sp.csr_matrix((value.data[start:end].copy(), value.indices[start:end].copy(),
                              np.asarray([0, end - start], dtype=value.indptr.dtype)), shape=(1, value.shape[1]))
    return np.asarray(value)[user : user + 1].copy()


def _add(row: sp.csr_matrix, cols: np.ndarray, values: np.ndarray, how: str) -> sp.csr_matrix:
    """A one-row matrix with `values` added at `cols`, by sum or by maximum per column."""
    if not len(cols):
        return row
    old = row.tocoo()
    c = np.concatenate([old.col, cols]).astype(np.int64)
    v = np.concatenate([old.data, values]).astype(np.float64)
    if how == "max":
        order = np.lexsort((-v, c))
        c, first = np.unique(c[order], return_index=True)
        v = v[order][first]
    merged = sp.csr_matrix((v, (np.zeros(len(c), dtype=np.int64), c)), shape=row.shape)
    merged.sum_duplicates()
    return merged


def _reweighted(share_row: sp.csr_matrix, total: float, cols: np.ndarray, weights: np.ndarray) -> sp.csr_matrix:
    """Affinity shares after adding positive weight per column: shares * total + new, renormalised."""
    keep = (cols >= 0) & (weights > 0)
    if not keep.any():
        return share_row
    mass = _add(share_row * total, cols[keep], weights[keep], "sum")
    new_total = float(mass.sum())
    return sp.csr_matrix(mass / new_total) if new_total > 0 else share_row


def user_view(
    state: FeatureState,
    user: int,
    blank: dict[str, Any],
    item_idx: np.ndarray,
    event_types: np.ndarray,
    ts: np.ndarray,
    weights: dict[str, float],
    social: SocialUpdates | None = None,
) -> FeatureState:
    """One user's state (row 0) after the online events (`item_idx` -1 for items the bundle lacks) and what
    reached them from others (`social`).

    `user` is the user's row in `state`, or -1 for a user the bundle has never seen (rows from `blank`).
    """
    rows = {name: (_row(getattr(state, name), user) if user >= 0 else _copy(blank[name])) for name in blank}
    known = item_idx >= 0
    items, kinds, times = item_idx[known], event_types[known], ts[known].astype(np.float64)
    w = np.asarray([weights.get(str(k), 0.0) for k in kinds], dtype=np.float64)
    positive = w > 0
    if len(kinds):
        counts = rows["user_type_counts"]
        for column, kind in enumerate(USER_EVENT_TYPES):
            counts[0, column] += float(np.sum(kinds == kind))
    all_times = ts.astype(np.float64)
    if len(all_times):
        rows["user_last_seen"][0] = np.nanmax([rows["user_last_seen"][0], all_times.max()])
    category = state.item_category[items]
    brand = state.item_brand[items]
    total = float(rows["pair_weight"].sum()) if user >= 0 else 0.0  # the user's row as of the bundle
    rows["user_category"] = _reweighted(rows["user_category"], total, category, w)
    rows["user_brand"] = _reweighted(rows["user_brand"], total, brand, w)
    has_cat = category >= 0
    rows["user_category_last"] = _add(rows["user_category_last"], category[has_cat], times[has_cat], "max")
    rows["pair_last"] = _add(rows["pair_last"], items[positive], times[positive], "max")
    bought = np.isin(kinds, list(CONVERSION_TYPES))
    rows["pair_purchases"] = _add(rows["pair_purchases"], items[bought], np.ones(int(bought.sum())), "sum")
    pair_weight = _add(rows["pair_weight"], items, w, "sum")
    rows["pair_weight"] = sp.csr_matrix(pair_weight.maximum(0))
    if np.isnan(rows["user_median_price"][0]) and bought.any():
        paid = state.item_price[items[bought]]
        if np.isfinite(paid).any():
            rows["user_median_price"][0] = float(np.nanmedian(paid))
    view_social = state.social
    if social is not None:
        _shared_to(rows, social)
        ties = social.ties[social.ties >= 0]
        rows["user_sees"] = _add(rows["user_sees"], ties, np.ones(len(ties)), "max")
        cells = _known(OnlineCells(social.friends, social.friend_items, social.friend_ts))
        shares = _known(social.friend_shares) if social.friend_shares is not None else None
        view_social = replace(state.social, recent_purchases=cells, recent_shares=shares)
        share_times = shares.value if shares is not None else np.empty(0)
        all_times = np.concatenate([all_times, social.share_ts, social.friend_ts, share_times]).astype(np.float64)
    if not len(all_times):
        return replace(state, **rows)
    # Events seen online are the newest the system knows of: friends' windows end at them, as they end at
    # the cut-off of a state rebuilt over the same events, never at the bundle's last day.
    view_social = replace(view_social, newest=float(np.nanmax([view_social.newest, all_times.max()])))
    newest = pd.Timestamp(float(all_times.max()) + 1.0, unit="s", tz="UTC")
    return replace(state, cutoff=max(state.cutoff, newest), social=view_social, **rows)


def _known(cells: OnlineCells) -> OnlineCells:
    """The cells whose person and item the bundle knows, times as float64."""
    keep = (cells.person >= 0) & (cells.col >= 0)
    return OnlineCells(cells.person[keep], cells.col[keep], cells.value[keep].astype(np.float64))


def _shared_to(rows: dict[str, Any], social: SocialUpdates) -> None:
    """The user's last share per item and its sharer (1 + idx; 0 for a sharer the bundle lacks), brought up
    to date with the shares received since the bundle."""
    known = social.share_items >= 0
    if not known.any():
        return
    items, sharers, times = social.share_items[known], social.sharers[known], social.share_ts[known]
    last_per_item = newest_per_key(times, items)
    items, sharers, times = items[last_per_item], sharers[last_per_item], times[last_per_item].astype(np.float64)
    last, by = rows["pair_shared_last"], rows["pair_shared_by"]
    before = np.asarray(last[0, items].toarray()).ravel()
    newer = times >= before
    if not newer.any():
        return
    rows["pair_shared_last"] = _add(last, items[newer], times[newer], "max")
    kept = by.tocoo()
    stay = ~np.isin(kept.col, items[newer])
    cols = np.concatenate([kept.col[stay], items[newer]]).astype(np.int64)
    values = np.concatenate([kept.data[stay], sharers[newer] + 1.0]).astype(np.float64)
    put = values > 0  # a sharer the bundle lacks is no sharer it can describe
    rows["pair_shared_by"] = sp.csr_matrix((values[put], (np.zeros(int(put.sum()), dtype=np.int64), cols[put])),
                                           shape=by.shape)


def _copy(value: Any) -> Any:
    return value.copy()
