"""The holdout that measures a model, by protocol: a cut in time, a random split of each user's distinct
items, or each user's last interaction.

`time`: bucketed data (few distinct times) holds out its last buckets; day-stamped or finer data is cut at a
day boundary near the wanted test fraction; data whose times are all equal carries no order, so a random
per-user split is used and the holdout says so. `random`: each user's distinct (user, item) pairs are split
at random, every event of a pair on the same side. `last`: each user's most recent pair is held out.
`auto` picks `time` when time has order and its holdout holds enough users to decide, else `random`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import pandas as pd

from training.params import SplitParams

HoldoutKind = Literal["explicit", "bucket", "day", "random-per-user", "random-pairs", "last"]
Protocol = Literal["time", "random", "last"]
MIN_TIME_TEST_USERS = 200  # auto: a time holdout with fewer returning users than this cannot decide


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


def random_pairs_holdout(events: pd.DataFrame, share: float, seed: int) -> Holdout:
    """Hold out about `share` of every user's distinct items, at random; all events of a pair stay together.

    Each user's pairs are shuffled and placed at evenly spaced positions with a random offset, so a user with
    n pairs holds out n * share of them on average and never more than one in excess.
    """
    rng = np.random.default_rng(seed)
    pairs = events[["user_id", "item_id"]].drop_duplicates().reset_index(drop=True)
    pairs = pairs.iloc[rng.permutation(len(pairs))]
    rank = pairs.groupby("user_id", sort=False).cumcount().to_numpy()
    size = pairs.groupby("user_id", sort=False)["user_id"].transform("size").to_numpy()
    offsets = pd.Series(rng.random(len(pairs)), index=pairs.index).groupby(pairs["user_id"].to_numpy(),
                                                                           sort=False).transform("first")
    position = (rank + offsets.to_numpy()) / size
    held = pairs.loc[(position >= 1.0 - share) & (size >= 2)]
    key = pd.MultiIndex.from_frame(events[["user_id", "item_id"]])
    is_test = key.isin(pd.MultiIndex.from_frame(held[["user_id", "item_id"]]))
    train, test = events.loc[~is_test], events.loc[is_test]
    if train.empty or test.empty:
        raise SplitError("a random split of the users' items leaves an empty part: too few repeat users")
    return Holdout(train, test, None, "random-pairs",
                   f"{share:.0%} of each user's distinct items held out at random (seed {seed})")


def last_holdout(events: pd.DataFrame) -> Holdout:
    """Hold out each user's most recent distinct item (users with at least two); ties by the later row."""
    last = events.assign(row=np.arange(len(events))).sort_values(["ts", "row"], kind="stable")
    newest = last.groupby("user_id", sort=False).tail(1)[["user_id", "item_id"]]
    counts = events.groupby("user_id")["item_id"].nunique()
    newest = newest.loc[newest["user_id"].map(counts).to_numpy() >= 2]
    key = pd.MultiIndex.from_frame(events[["user_id", "item_id"]])
    is_test = key.isin(pd.MultiIndex.from_frame(newest))
    train, test = events.loc[~is_test], events.loc[is_test]
    if train.empty or test.empty:
        raise SplitError("leaving each user's last item out leaves an empty part")
    return Holdout(train, test, None, "last", "each user's most recent item held out")


def has_time_order(events: pd.DataFrame) -> bool:
    return bool(events["ts"].nunique() > 1)


def choose_protocol(events: pd.DataFrame, params: SplitParams, asked: str) -> tuple[Protocol, str]:
    """The protocol a run follows, and why: as asked, or for `auto` time when time has order and its holdout
    holds at least MIN_TIME_TEST_USERS users who also acted before the cut, else random."""
    if asked in ("random", "last"):
        return cast(Protocol, asked), f"--protocol {asked}"
    if not has_time_order(events):
        why = "every event carries the same time, so time has no order"
        if asked == "time":
            raise SplitError(f"--protocol time: {why}; use random or last")
        return "random", why
    if asked == "time":
        return "time", "--protocol time"
    try:
        holdout = time_holdout(events, params)
    except SplitError as exc:
        return "random", f"the time holdout cannot be made ({exc})"
    returning = np.intersect1d(holdout.test["user_id"].unique(), holdout.train["user_id"].unique())
    if len(returning) < MIN_TIME_TEST_USERS:
        return "random", (f"the time holdout ({holdout.note}) has {len(returning)} returning users, fewer than "
                          f"{MIN_TIME_TEST_USERS}: too few to decide on")
    return "time", f"time has order and its holdout has {len(returning):,} returning users"


def protocol_holdout(events: pd.DataFrame, params: SplitParams, protocol: Protocol) -> Holdout:
    if protocol == "time":
        return time_holdout(events, params)
    if protocol == "last":
        return last_holdout(events)
    return random_pairs_holdout(events, params.test_fraction, params.random_seed)
