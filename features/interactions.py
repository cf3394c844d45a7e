"""The weighted user-item matrix that collaborative filtering learns from.

Rows are users and columns items (`user_items`, CSR). A cell is the sum of its events' weights, so a
refund cancels its purchase; cells that end at zero or below are removed, not kept as negatives.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.vocab import Vocabulary


def event_weights(events: pd.DataFrame, weights: dict[str, float]) -> np.ndarray:
    """Each event's confidence weight, from its type (types without a weight count zero)."""
    values: np.ndarray = events["event_type"].map(weights).fillna(0.0).to_numpy(dtype=np.float32)
    return values


def recency_decay(ts: pd.Series, now: pd.Timestamp, half_life_days: float | None) -> np.ndarray:
    """Weight multiplier halving every `half_life_days` before `now` (1 everywhere when None)."""
    if half_life_days is None:
        return np.ones(len(ts), dtype=np.float32)
    age_days = np.clip((now - ts).dt.total_seconds().to_numpy() / 86_400.0, 0.0, None)
    decay: np.ndarray = np.power(0.5, age_days / half_life_days).astype(np.float32)
    return decay


def user_items_matrix(
    events: pd.DataFrame,
    users: Vocabulary,
    items: Vocabulary,
    weights: dict[str, float],
    *,
    now: pd.Timestamp | None = None,
    half_life_days: float | None = None,
) -> sp.csr_matrix:
    """Users x items CSR of summed event weights; events of ids outside the vocabularies are ignored.

    With a half-life, each event's weight decays with its age at `now`, so recent taste counts more.
    """
    rows = users.indexes(events["user_id"])
    cols = items.indexes(events["item_id"])
    values = event_weights(events, weights)
    if half_life_days is not None:
        if now is None:
            raise ValueError("a recency half-life needs the moment `now` to measure age from")
        values = values * recency_decay(events["ts"], now, half_life_days)
    keep = (rows >= 0) & (cols >= 0) & (values != 0)
    matrix = sp.csr_matrix(
        (values[keep], (rows[keep], cols[keep])), shape=(len(users), len(items)), dtype=np.float32
    )
    matrix.sum_duplicates()
    matrix.data[matrix.data < 0] = 0.0
    matrix.eliminate_zeros()
    return matrix


def scale_confidence(user_items: sp.csr_matrix, scale: str) -> sp.csr_matrix:
    """Confidence from summed weights: `linear` keeps them, `log` damps heavy repeats (log1p)."""
    if scale == "linear":
        return user_items
    if scale == "log":
        scaled = user_items.copy()
        scaled.data = np.log1p(scaled.data).astype(np.float32)
        return scaled
    raise ValueError(f"unknown confidence scale: {scale!r} (linear or log)")
