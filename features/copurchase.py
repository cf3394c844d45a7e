"""Co-purchase ("bought together"): for each item, the items most often bought or carted with it.

A basket is one user's purchases and add-to-carts within one UTC day (or, configured, within one session,
falling back to the day for events without a session id). Pairs are scored by their Ochiai coefficient
(co-baskets over the geometric mean of each item's baskets) and kept only above a minimum support and when
they co-occur more than chance (lift > 1), so an item in every other basket is not everybody's companion.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.schema import EventType
from features.vocab import Vocabulary

BASKET_EVENT_TYPES = (EventType.PURCHASE.value, EventType.ADD_TO_CART.value)


@dataclass(frozen=True, slots=True)
class CopurchaseConfig:
    top_k: int = 20  # companions kept per item
    min_support: int = 2  # baskets a pair must share
    min_lift: float = 1.0  # co-occurrence over what independent choices would give; keep pairs above it
    max_basket_items: int = 50  # larger baskets (bulk orders, scrapers) say little about pairs: skipped
    basket: Literal["day", "session"] = "day"


def basket_items(
    events: pd.DataFrame,
    items: Vocabulary,
    basket: Literal["day", "session"] = "day",
    event_types: Iterable[str] = BASKET_EVENT_TYPES,
) -> sp.csr_matrix:
    """Baskets x items, 1 where the basket holds the item (item ids outside `items` are ignored)."""
    chosen = events.loc[events["event_type"].isin(list(event_types))]
    cols = items.indexes(chosen["item_id"])
    keep = cols >= 0
    chosen, cols = chosen.loc[keep], cols[keep]
    day = pd.to_datetime(chosen["ts"], utc=True).dt.floor("D")
    if basket == "session" and "session_id" in chosen.columns:
        session = chosen["session_id"].astype("str").fillna("")
        day = day.where(session == "")  # a session is the basket; the day only when there is none
    else:
        session = pd.Series("", index=chosen.index, dtype="str")
    keys = pd.DataFrame({"user": chosen["user_id"].astype("str"), "session": session, "day": day})
    rows = keys.groupby(["user", "session", "day"], sort=False, dropna=False).ngroup().to_numpy(np.int64)
    n_baskets = int(rows.max()) + 1 if len(rows) else 0
    matrix = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n_baskets, len(items)), dtype=np.float32
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def top_per_row(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The `k` largest entries of each row (ties by column index), as a CSR of the same shape."""
    coo = matrix.tocoo()
    order = np.lexsort((coo.col, -coo.data, coo.row))
    rows, cols, data = coo.row[order], coo.col[order], coo.data[order]
    starts = np.searchsorted(rows, rows, side="left")
    keep = (np.arange(len(rows)) - starts) < k
    return sp.csr_matrix((data[keep], (rows[keep], cols[keep])), shape=matrix.shape, dtype=np.float32)


def bought_together(
    events: pd.DataFrame, items: Vocabulary, config: CopurchaseConfig | None = None
) -> sp.csr_matrix:
    """Items x items CSR: row i holds i's best companions (Ochiai score), at most `top_k` per row."""
    config = config or CopurchaseConfig()
    baskets = basket_items(events, items, config.basket)
    n_items = len(items)
    # Chance is measured over every basket (single items included); pairs come from baskets of a sane size.
    total = float(baskets.shape[0])
    per_item = np.asarray(baskets.sum(axis=0), dtype=np.float64).ravel()  # baskets holding each item
    sizes = np.diff(baskets.indptr)
    baskets = baskets[(sizes >= 2) & (sizes <= config.max_basket_items)]
    if baskets.shape[0] == 0:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    together = (baskets.T @ baskets).tocoo()  # co-baskets per pair (and per item on the diagonal)
    i, j, count = together.row, together.col, together.data.astype(np.float64)
    expected = per_item[i] * per_item[j] / total
    keep = (i != j) & (count >= config.min_support) & (count > config.min_lift * expected)
    i, j, count = i[keep], j[keep], count[keep]
    score = (count / np.sqrt(per_item[i] * per_item[j])).astype(np.float32)
    pairs = sp.csr_matrix((score, (i, j)), shape=(n_items, n_items), dtype=np.float32)
    return top_per_row(pairs, config.top_k)
