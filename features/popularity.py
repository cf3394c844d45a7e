"""Popular and trending items as of a moment ("now"), the last two steps of every fallback chain.

Popular counts the distinct users with a positive signal on an item; trending sums event weights with an
exponential decay back from "now", so a replay of old data still has trending items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.interactions import event_weights
from features.vocab import Vocabulary


@dataclass(frozen=True, slots=True)
class ItemPopularity:
    popular: np.ndarray  # float32 per item idx: distinct users with a positive signal
    trending: np.ndarray  # float32 per item idx: decayed weighted events as of `now`


def item_popularity(
    events: pd.DataFrame,
    items: Vocabulary,
    weights: dict[str, float],
    now: pd.Timestamp,
    half_life_days: float,
) -> ItemPopularity:
    """Both tables from events at or before `now` (later events are ignored: features are as of now)."""
    past = events.loc[events["ts"] <= now]
    cols = items.indexes(past["item_id"])
    values = event_weights(past, weights)
    keep = (cols >= 0) & (values > 0)
    cols, values = cols[keep], values[keep]
    users = past["user_id"].to_numpy()[keep]
    age_days = ((now - past["ts"]).dt.total_seconds().to_numpy()[keep] / 86_400.0).astype(np.float64)
    decay = np.power(0.5, age_days / half_life_days)
    trending = np.bincount(cols, weights=values * decay, minlength=len(items)).astype(np.float32)
    pairs = pd.DataFrame({"item": cols, "user": users}).drop_duplicates()
    popular = np.bincount(pairs["item"].to_numpy(), minlength=len(items)).astype(np.float32)
    return ItemPopularity(popular=popular, trending=trending)


def ranked(scores: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Item indexes with a positive score, best first (ties by index, so the order is stable)."""
    positive = np.flatnonzero(scores > 0)
    order = positive[np.lexsort((positive, -scores[positive]))]
    return order if limit is None else order[:limit]
