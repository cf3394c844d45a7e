"""The holdout that measures a model: a cut in time on the data's own resolution.

Bucketed data (few distinct times) holds out its last buckets; day-stamped or finer data is cut at a day
boundary near the wanted test fraction; data whose times are all equal carries no order, so a random
per-user split is used and the holdout says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import pandas as pd

from training.params import SplitParams

HoldoutKind = Literal["explicit", "bucket", "day", "random-per-user"]


class SplitError(ValueError):
    """The data cannot be split into a non-empty train and test part."""


@dataclass(frozen=True, slots=True)
class Holdout:
    train: pd.DataFrame
    test: pd.DataFrame
    cut: pd.Timestamp | None  # None for the random split
    kind: HoldoutKind
    note: str


def _random_per_user(events: pd.DataFrame, params: SplitParams) -> Holdout:
    rng = np.random.default_rng(params.random_seed)
    order = rng.permutation(len(events))
    shuffled = events.iloc[order]
    rank = shuffled.groupby("user_id", sort=False).cumcount().to_numpy()
    size = shuffled.groupby("user_id", sort=False)["user_id"].transform("size").to_numpy()
    n_test = np.maximum(1, np.floor(size * params.test_fraction)).astype(int)
    is_test = (size >= 2) & (rank < n_test)
    test = shuffled.loc[is_test].sort_index()
    train = shuffled.loc[~is_test].sort_index()
    return Holdout(train, test, None, "random-per-user",
                   "all timestamps are equal: time carries no order, so a random per-user split was used")


def _cut_at(events: pd.DataFrame, cut: pd.Timestamp, kind: HoldoutKind, note: str) -> Holdout:
    is_test = (events["ts"] >= cut).to_numpy()
    train, test = events.loc[~is_test], events.loc[is_test]
    if train.empty or test.empty:
        raise SplitError(f"cut at {cut.isoformat()} leaves an empty {'train' if train.empty else 'test'} part")
    return Holdout(train, test, cut, kind, note)


def time_holdout(events: pd.DataFrame, params: SplitParams) -> Holdout:
    """Split `events` (sorted by `ts`) into what a model may see and what it is measured on."""
    if params.cut is not None:
        cut = pd.Timestamp(params.cut)
        cut = cut.tz_localize("UTC") if cut.tzinfo is None else cut.tz_convert("UTC")
        return _cut_at(events, cut, "explicit", f"explicit cut at {cut.isoformat()}")
    times = np.sort(events["ts"].unique())
    if len(times) == 1:
        return _random_per_user(events, params)
    if len(times) <= params.max_buckets:
        buckets = min(params.test_buckets, len(times) - 1)
        cut = pd.Timestamp(times[-buckets]).tz_convert("UTC")
        return _cut_at(events, cut, "bucket",
                       f"{len(times)} distinct times: the last {buckets} bucket(s) from {cut.isoformat()} held out")
    quantile = cast(pd.Timestamp, events["ts"].quantile(1.0 - params.test_fraction))
    first = pd.Timestamp(times[0]).tz_convert("UTC")
    day = quantile.floor("D")
    if day > first:
        return _cut_at(events, day, "day", f"cut at the day boundary {day.isoformat()}")
    if quantile > first:
        return _cut_at(events, quantile, "day", f"cut at {quantile.isoformat()} (data spans less than a day)")
    # Most events share the first time (a backfill): the test part starts at the next distinct time.
    following = pd.Timestamp(times[1]).tz_convert("UTC")
    return _cut_at(events, following, "day", f"cut at {following.isoformat()}, the first time after a backfill")


def validation_cut(holdout: Holdout, params: SplitParams) -> pd.Timestamp:
    """The cut inside the train part, made the way the holdout was made: [it, holdout.cut) is the validation
    window that model choices are fitted on, never the reported test."""
    inner = time_holdout(holdout.train, SplitParams(**{**params.model_dump(), "cut": None}))
    if inner.cut is None:
        raise SplitError("the training part carries no time order: a validation window needs one")
    return inner.cut
