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
    return events["event_type"].map(weights).fillna(0.0).to_numpy(dtype=np.float32)


def user_items_matrix(
    events: pd.DataFrame, users: Vocabulary, items: Vocabulary, weights: dict[str, float]
) -> sp.csr_matrix:
    """Users x items CSR of summed event weights; events of ids outside the vocabularies are ignored."""
    rows = users.indexes(events["user_id"])
    cols = items.indexes(events["item_id"])
    values = event_weights(events, weights)
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
