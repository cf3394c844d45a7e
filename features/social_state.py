"""The social part of the feature state as of a cut-off: whom each user sees, what was shared to them and by
whom, everyone's shares, sharer influence and item share rates; and the per-pair reads of friends' rows.

Friends' activity is read per candidate pair from the rows of the people a user sees (never as a full
users x users x items product), so the cost follows the candidates, not the catalog or the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.attribution import attribute
from features.schema import EventType
from features.social import build_social_graph
from features.vocab import Vocabulary

COMMUNITY_CAP = 400  # people in a user's community (those they see, then whom those see), at most


@dataclass(frozen=True, slots=True)
class OnlineCells:
    """Cells of a few people's rows that arrived after the cut-off (the service's online store), to be read
    over a matrix's rows: person (user idx), column (item idx), epoch seconds."""

    person: np.ndarray
    col: np.ndarray
    value: np.ndarray


@dataclass(frozen=True, slots=True)
class SocialView:
    """Everyone's rows, read for a user's friends; a one-user view of the state keeps these whole."""

    touched: sp.csr_matrix  # users x items: epoch seconds of the last positive event (the state's pair_last)
    bought: sp.csr_matrix  # users x items: epoch seconds of the last purchase (the state's pair_last_purchase)
    shared: sp.csr_matrix  # users x items: epoch seconds of the last share of the item BY the user
    influence: np.ndarray  # per user idx: sharer influence from attribution as of the cut (0: none)
    sway: np.ndarray  # per user idx: how often people act on the user's shares, over the usual rate (1: unknown)
    sees: sp.csr_matrix  # users x users (the state's user_sees): for whom the user's friends see
    newest: float = float("nan")  # epoch seconds of the newest cell in the rows above; NaN when all are empty
    recent_purchases: OnlineCells | None = None  # a one-user view's: the friends' purchases since the cut-off
    recent_shares: OnlineCells | None = None  # a one-user view's: what the friends shared since the cut-off

    def bought_cells(self, people: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`row_cells` of `bought` for `people`, with their purchases since the cut-off."""
        return merged_cells(self.bought, self.recent_purchases, people)

    def touched_cells(self, people: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`row_cells` of `touched` for `people`, with their purchases and shares since the cut-off (positive
        events; their views are not read online)."""
        recent = [c for c in (self.recent_purchases, self.recent_shares) if c is not None]
        both = OnlineCells(*(np.concatenate([getattr(c, f) for c in recent]) for f in ("person", "col", "value"))
                           ) if len(recent) > 1 else (recent[0] if recent else None)
        return merged_cells(self.touched, both, people)

    def shared_cells(self, people: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`row_cells` of `shared` for `people`, with what they shared since the cut-off."""
        return merged_cells(self.shared, self.recent_shares, people)

    @classmethod
    def of(cls, touched: sp.csr_matrix, bought: sp.csr_matrix, shared: sp.csr_matrix, influence: np.ndarray,
           sway: np.ndarray, sees: sp.csr_matrix) -> SocialView:
        """The view, with the time of its newest cell (friends' windows are measured back from it)."""
        newest = max((float(m.data.max()) for m in (touched, bought, shared) if m.nnz), default=float("nan"))
        return cls(touched, bought, shared, influence, sway, sees, newest)


@dataclass(frozen=True, slots=True)
class SocialFields:
    user_sees: sp.csr_matrix  # users x users: 1 where the row user sees the column user's activity
    pair_shared_last: sp.csr_matrix  # users x items: epoch seconds of the last share of the item TO the user
    pair_shared_by: sp.csr_matrix  # users x items: 1 + user idx of that last sharer
    item_share_rate: np.ndarray  # shares per view of the item; NaN when neither
    item_referral_rate: np.ndarray  # referred purchases per referred view; NaN when never referred
    shared: sp.csr_matrix
    influence: np.ndarray
    sway: np.ndarray


def _last_by(rows: np.ndarray, cols: np.ndarray, ts: np.ndarray, by: np.ndarray,
             shape: tuple[int, int]) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Per (row, col): the latest ts and the `by` of that latest event."""
    order = np.lexsort((ts, cols, rows))
    rows, cols, ts, by = rows[order], cols[order], ts[order], by[order]
    last = np.ones(len(rows), dtype=bool)
    if len(rows) > 1:
        last[:-1] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    rows, cols = rows[last], cols[last]
    return (sp.csr_matrix((ts[last], (rows, cols)), shape=shape),
            sp.csr_matrix((by[last].astype(np.float64), (rows, cols)), shape=shape))


def build_social_fields(past: pd.DataFrame, u: np.ndarray, i: np.ndarray, ts: np.ndarray, users: Vocabulary,
                        items: Vocabulary, social: pd.DataFrame | None, cutoff: pd.Timestamp) -> SocialFields:
    """`past` holds only events before `cutoff` whose user and item are known (`u`, `i`, `ts` per row)."""
    n_users, n_items = len(users), len(items)
    graph = build_social_graph(social, past, cutoff, users=users)
    src = np.repeat(np.arange(graph.n_users, dtype=np.int64), np.diff(graph.indptr))
    dst = graph.indices.astype(np.int64)
    keep = (src < n_users) & (dst < n_users)  # ties to people without events carry nothing to read
    sees = sp.csr_matrix((np.ones(int(keep.sum()), dtype=np.float32), (dst[keep], src[keep])),
                         shape=(n_users, n_users))
    sees.sum_duplicates()
    sees.data[:] = 1.0

    kinds = past["event_type"].to_numpy()
    is_share = kinds == EventType.SHARE
    shared = sp.csr_matrix((n_users, n_items))
    if is_share.any():
        shared = _last_by(u[is_share], i[is_share], ts[is_share], np.zeros(int(is_share.sum())), (n_users, n_items))[0]
    to_last = sp.csr_matrix((n_users, n_items))
    to_by = sp.csr_matrix((n_users, n_items))
    if "target_user_id" in past.columns and is_share.any():
        recipient = users.indexes(past["target_user_id"].where(pd.Series(is_share, index=past.index)).fillna(""))
        ok = is_share & (recipient >= 0) & (recipient != u)
        if ok.any():
            to_last, to_by = _last_by(recipient[ok], i[ok], ts[ok], u[ok] + 1.0, (n_users, n_items))

    attribution = attribute(past, cutoff)
    influence = np.zeros(n_users)
    sway = np.ones(n_users)
    if len(attribution.users):
        idx = users.indexes(pd.Series(attribution.users.index, dtype="str"))
        influence[idx[idx >= 0]] = attribution.users["influence"].to_numpy(np.float64)[idx >= 0]
        if attribution.rates["open_rate"] > 0:  # smoothed toward the usual rate: few shares say little
            opened = attribution.users["open_rate"].to_numpy(np.float64) / attribution.rates["open_rate"]
            sway[idx[idx >= 0]] = opened[idx >= 0]
    share_rate = np.full(n_items, np.nan)
    referral_rate = np.full(n_items, np.nan)
    if len(attribution.items):
        stats = attribution.items
        idx = items.indexes(pd.Series(stats.index, dtype="str"))
        ok = idx >= 0
        share_rate[idx[ok]] = stats["share_rate"].to_numpy(np.float64)[ok]
        referred = stats["referred_views"].to_numpy() > 0
        referral_rate[idx[ok & referred]] = stats["referral_conversion_rate"].to_numpy(np.float64)[ok & referred]
    return SocialFields(sees, to_last, to_by, share_rate, referral_rate, shared, influence, sway)


def row_cells(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored cells of `rows` of a CSR matrix: (position in `rows`, column, value), without copying rows."""
    starts, ends = matrix.indptr[rows], matrix.indptr[rows + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    if not total:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0)
    owner = np.repeat(np.arange(len(rows)), lengths)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    at = offsets + np.arange(total)
    return owner, matrix.indices[at].astype(np.int64), matrix.data[at]


def merged_cells(matrix: sp.csr_matrix, extra: OnlineCells | None, people: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`row_cells(matrix, people)` with the `extra` cells of those people (distinct people), the newest value
    where both hold a cell."""
    owner, cols, values = row_cells(matrix, people)
    if extra is None or not len(extra.person) or not len(people):
        return owner, cols, values
    order = np.argsort(people, kind="stable")
    ordered = people[order]
    at = np.minimum(np.searchsorted(ordered, extra.person), len(ordered) - 1)
    hit = ordered[at] == extra.person
    if not hit.any():
        return owner, cols, values
    owner = np.concatenate([owner, order[at[hit]]])
    cols = np.concatenate([cols, extra.col[hit]])
    values = np.concatenate([values.astype(np.float64), extra.value[hit]])
    keep = newest_per_key(values, owner, cols)
    return owner[keep], cols[keep], values[keep]


def newest_per_key(values: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Positions of the largest value (the newest time) of each distinct key, the tuple of `keys` (first key
    first), in key order."""
    order = np.lexsort((-values, *reversed(keys)))
    same = np.ones(max(len(order) - 1, 0), dtype=bool)  # same key as the one before
    for key in keys:
        ordered = key[order]
        same &= ordered[1:] == ordered[:-1]
    first = np.ones(len(order), dtype=bool)
    first[1:] = ~same
    return order[first]


def friends_of(sees: sp.csr_matrix, user: int) -> np.ndarray:
    if user < 0:
        return np.empty(0, dtype=np.int64)
    return np.asarray(sees.indices[sees.indptr[user] : sees.indptr[user + 1]], dtype=np.int64)


def community_of(sees_row: np.ndarray, sees_all: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """The people a user sees (weight 1) and, up to COMMUNITY_CAP, whom they see (weight 0.5)."""
    first = sees_row[:COMMUNITY_CAP]
    _, second, _ = row_cells(sees_all, first)
    second = _without(sorted_unique(second), first)[: max(COMMUNITY_CAP - len(first), 0)]
    people = np.concatenate([first, second])
    return people, np.concatenate([np.ones(len(first)), np.full(len(second), 0.5)])


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique(values) by a sort: numpy 2.4's np.unique (hash based) is ~20x slower on a few thousand ints."""
    ordered: np.ndarray = np.sort(values)
    if len(ordered) < 2:
        return ordered
    first = np.ones(len(ordered), dtype=bool)
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


def _without(ordered: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """The sorted unique `ordered` without the values of `drop` (np.setdiff1d, by binary search of the few
    dropped values)."""
    if not len(ordered) or not len(drop):
        return ordered
    at = np.minimum(np.searchsorted(ordered, drop), len(ordered) - 1)
    keep = np.ones(len(ordered), dtype=bool)
    keep[at[ordered[at] == drop]] = False
    return ordered[keep]


CellReader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True, slots=True)
class FriendActivity:
    """What the people a pair's user sees did with the pair's item, read from one matrix of epoch seconds."""

    counts: np.ndarray  # pairs x thresholds: how many of them have a cell at or after the threshold
    weighted: np.ndarray  # pairs x thresholds: the same people summed by their weight (1 each without weights)
    latest: np.ndarray  # pairs: the newest of their cells; 0 when none has one


def friend_activity(sees: sp.csr_matrix, readers: Sequence[CellReader], rows: np.ndarray, item_idx: np.ndarray,
                    since: tuple[float, ...], weights: Sequence[np.ndarray | None] = ()) -> list[FriendActivity]:
    """Per reader: the activity of the people each pair's user sees on the pair's item. `rows` index `sees`;
    a reader gives the cells (epoch seconds) of everyone's rows (columns: items) as `row_cells` does, one per
    (person, item); `weights[k]` (per user idx) weigh each person in reader k's `weighted`; a reader without
    weights (None, or past the end of `weights`) sums 1 per person, its `weighted` equal to its `counts`."""
    per_reader = [*weights, *[None] * (len(readers) - len(weights))]
    width = len(since)
    out = [FriendActivity(np.zeros((len(rows), width)), np.zeros((len(rows), width)), np.zeros(len(rows)))
           for _ in readers]
    if not len(rows):
        return out
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    bounds = np.flatnonzero(np.concatenate([[True], sorted_rows[1:] != sorted_rows[:-1], [True]]))
    thresholds = np.asarray(since)
    for start, end in pairwise(bounds.tolist()):
        user = int(sorted_rows[start])
        friends = friends_of(sees, user)
        if not len(friends):
            continue
        positions = order[start:end]
        wanted = item_idx[positions]
        rank = np.argsort(wanted, kind="stable")
        ordered = wanted[rank]
        first_of = rank[np.searchsorted(ordered, wanted)]  # an item listed twice for a user: same values on both
        for read, activity, weight_of in zip(readers, out, per_reader, strict=True):
            owner, cols, values = read(friends)
            if not len(cols):
                continue
            at = np.minimum(np.searchsorted(ordered, cols), len(ordered) - 1)
            hit = ordered[at] == cols
            if not hit.any():
                continue
            slot, value = rank[at[hit]], values[hit]
            reached = value[:, None] >= thresholds[None, :]  # person's cell x threshold
            cells = (slot[:, None] * width + np.arange(width))[reached]
            size = len(wanted) * width
            activity.counts[positions] = np.bincount(cells, minlength=size).reshape(len(wanted), width)[first_of]
            if weight_of is None:
                activity.weighted[positions] = activity.counts[positions]
            else:
                weight = np.broadcast_to(weight_of[friends[owner[hit]]][:, None], reached.shape)[reached]
                summed = np.bincount(cells, weights=weight, minlength=size).reshape(len(wanted), width)
                activity.weighted[positions] = summed[first_of]
            latest = np.zeros(len(wanted))
            np.maximum.at(latest, slot, value)
            activity.latest[positions] = latest[first_of]
    return out
