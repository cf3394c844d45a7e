"""The holdout protocols: no held-out pair leaks into the part models are fitted on, and `auto` says why."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.params import SplitParams
from training.split import SplitError, choose_protocol, last_holdout, protocol_holdout, random_pairs_holdout


def _events(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "day"])
    ts = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(frame["day"], unit="D")
    return frame.assign(ts=ts, event_type="purchase").drop(columns="day").sort_values("ts", kind="stable")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([f"u{i}" for i in range(6)]), st.sampled_from([f"i{i}" for i in range(9)]),
                          st.integers(0, 5)), min_size=12, max_size=80), st.integers(0, 1000))
def test_random_split_keeps_every_pair_on_one_side(rows: list[tuple[str, str, int]], seed: int) -> None:
    events = _events(rows)
    try:
        holdout = random_pairs_holdout(events, 0.25, seed)
    except SplitError:
        return
    train_pairs = set(zip(holdout.train["user_id"], holdout.train["item_id"], strict=True))
    test_pairs = set(zip(holdout.test["user_id"], holdout.test["item_id"], strict=True))
    assert not train_pairs & test_pairs
    assert len(holdout.train) + len(holdout.test) == len(events)
    # a user's only item is never held out
    single = events.groupby("user_id")["item_id"].nunique()
    assert not set(holdout.test["user_id"]) & set(single[single < 2].index)


def test_random_split_holds_out_about_the_share_asked() -> None:
    rng = np.random.default_rng(3)
    rows = [(f"u{u}", f"i{i}", 0) for u in range(200) for i in rng.choice(500, 30, replace=False)]
    holdout = random_pairs_holdout(_events(rows), 0.1, 5)
    share = holdout.test[["user_id", "item_id"]].drop_duplicates().shape[0] / 6000
    assert 0.09 <= share <= 0.11


def test_last_protocol_holds_out_each_users_newest_item() -> None:
    events = _events([("a", "x", 0), ("a", "y", 2), ("a", "x", 3), ("b", "z", 1), ("c", "p", 0), ("c", "q", 1)])
    holdout = last_holdout(events)
    assert sorted(zip(holdout.test["user_id"], holdout.test["item_id"], strict=True)) == [("a", "x"), ("a", "x"),
                                                                                          ("c", "q")]
    assert ("a", "y") in set(zip(holdout.train["user_id"], holdout.train["item_id"], strict=True))


def test_auto_protocol_says_why() -> None:
    flat = _events([(f"u{u}", f"i{i}", 0) for u in range(20) for i in range(5)])
    assert choose_protocol(flat, SplitParams(), "auto") == ("random",
                                                           "every event carries the same time, so time has no order")
    with pytest.raises(SplitError, match="no order"):
        choose_protocol(flat, SplitParams(), "time")
    few = _events([(f"u{u}", f"i{(u + d) % 7}", d) for u in range(30) for d in range(20)])
    protocol, why = choose_protocol(few, SplitParams(), "auto")
    assert protocol == "random"
    assert "fewer than 200" in why
    many = _events([(f"u{u}", f"i{(u + d) % 7}", d) for u in range(300) for d in range(20)])
    assert choose_protocol(many, SplitParams(), "auto")[0] == "time"
    assert choose_protocol(many, SplitParams(), "last") == ("last", "--protocol last")
    assert protocol_holdout(many, SplitParams(), "time").cut is not None
