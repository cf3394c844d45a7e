"""Friends' activity windows end at the cut-off, or at the newest event when that is over a day older: on
bucketed data (every event at its bucket's start, the cut-off at the next bucket's start) the latest bucket is
"recent", not half a year old; on continuous and daily data the windows are as they were. The friends' purchases
source puts today's purchase of one friend before one of two friends a fortnight ago, and a buyer nobody acts
on last."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from features.candidates import friends_bought_candidates
from features.ranking import FEATURE_NAMES, pair_features
from features.state import build_state
from features.vocab import Vocabulary
from training.bundle import ITEM_META_COLUMNS
from training.window import item_meta_frame

BUCKETS = [pd.Timestamp(day, tz="UTC") for day in ("2004-01-01", "2004-07-01", "2005-01-01")]
SOCIAL = pd.DataFrame({"user_id": ["ann"], "friend_id": ["ben"], "kind": ["friend"]})


def _events(times: list[pd.Timestamp]) -> pd.DataFrame:
    """Ben bought a lamp in the first period and a rug in the second; Ann viewed the lamp in the first."""
    rows = [("ben", "lamp", "purchase", times[0]), ("ann", "lamp", "view", times[0]),
            ("ben", "rug", "purchase", times[1])]
    return pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                         "event_type": [r[2] for r in rows],
                         "ts": pd.Series([r[3] for r in rows], dtype="datetime64[ns, UTC]")})


def _ann_sees(times: list[pd.Timestamp], cutoff: pd.Timestamp) -> tuple[dict[str, np.ndarray], list[str], float]:
    users, items = Vocabulary.from_ids(["ann", "ben"]), Vocabulary.from_ids(["lamp", "rug"])
    meta = item_meta_frame(items, None, ITEM_META_COLUMNS)
    state = build_state(_events(times), users, items, meta, {"purchase": 5.0, "view": 1.0}, cutoff, [], [], SOCIAL)
    matrix = pair_features(state, np.asarray([0, 0]), np.asarray([0, 1]), {}, {})
    found, _ = friends_bought_candidates(state, 0, 10, None)
    return ({name: matrix[:, k] for k, name in enumerate(FEATURE_NAMES)}, [items.id_of(int(i)) for i in found],
            state.social_seconds)


def test_on_bucketed_data_the_latest_bucket_is_recent() -> None:
    features, proposed, end = _ann_sees(BUCKETS[:2], cutoff=BUCKETS[2])
    assert end == BUCKETS[1].value / 1e9  # the newest event, not the cut-off half a year later
    for days in (1, 3, 7, 30):  # the rug (latest bucket) in every window, the lamp (a bucket before) in none
        assert features[f"friends_bought_{days}d"].tolist() == [0.0, 1.0]
    assert features["friends_bought_all"].tolist() == [1.0, 1.0]
    assert proposed == ["rug"]


@pytest.mark.parametrize("last_hours", [0.5, 23.0])
def test_on_continuous_or_daily_data_the_windows_end_at_the_cut(last_hours: float) -> None:
    cutoff = pd.Timestamp("2024-03-10", tz="UTC")
    times = [cutoff - pd.Timedelta(days=20), cutoff - pd.Timedelta(hours=last_hours)]
    features, proposed, end = _ann_sees(times, cutoff)
    assert end == cutoff.value / 1e9
    assert features["friends_bought_1d"].tolist() == [0.0, 1.0]
    assert features["friends_bought_3d"].tolist() == [0.0, 1.0]
    assert features["friends_bought_30d"].tolist() == [1.0, 1.0]
    assert set(proposed) == {"lamp", "rug"}


def test_after_a_pause_of_days_the_windows_end_at_the_newest_event() -> None:
    cutoff = pd.Timestamp("2024-03-10", tz="UTC")
    times = [cutoff - pd.Timedelta(days=8), cutoff - pd.Timedelta(days=5)]
    features, _, end = _ann_sees(times, cutoff)
    assert end == times[1].value / 1e9
    assert features["friends_bought_1d"].tolist() == [0.0, 1.0]  # 0 days before the newest event
    assert features["friends_bought_7d"].tolist() == [1.0, 1.0]


def test_nothing_after_the_cut_moves_the_windows() -> None:
    later = pd.DataFrame({"user_id": ["ben"], "item_id": ["lamp"], "event_type": ["purchase"],
                          "ts": pd.Series([BUCKETS[2]], dtype="datetime64[ns, UTC]")})
    users, items = Vocabulary.from_ids(["ann", "ben"]), Vocabulary.from_ids(["lamp", "rug"])
    meta = item_meta_frame(items, None, ITEM_META_COLUMNS)
    events = pd.concat([_events(BUCKETS[:2]), later], ignore_index=True)
    state = build_state(events, users, items, meta, {"purchase": 5.0, "view": 1.0}, BUCKETS[2], [], [], SOCIAL)
    assert state.social_seconds == BUCKETS[1].value / 1e9


def _friends_bought_order(rows: list[tuple[str, str, pd.Timedelta]], sway: dict[str, float]) -> list[str]:
    """Ann sees ben, cat and dan, who bought (person, item, how long before the cut); `sway` overrides theirs."""
    cutoff = pd.Timestamp("2024-03-10", tz="UTC")
    events = pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                           "event_type": "purchase",
                           "ts": pd.Series([cutoff - r[2] for r in rows], dtype="datetime64[ns, UTC]")})
    people = ["ann", "ben", "cat", "dan"]
    users, items = Vocabulary.from_ids(people), Vocabulary.from_ids(sorted({r[1] for r in rows}))
    social = pd.DataFrame({"user_id": "ann", "friend_id": people[1:], "kind": "friend"})
    state = build_state(events, users, items, item_meta_frame(items, None, ITEM_META_COLUMNS), {"purchase": 5.0},
                        cutoff, [], [], social)
    weights = state.social.sway.copy()
    for person, value in sway.items():
        weights[people.index(person)] = value
    state = replace(state, social=replace(state.social, sway=weights))
    found, _ = friends_bought_candidates(state, 0, 10, None)
    return [items.id_of(int(i)) for i in found]


def test_a_friend_s_purchase_of_today_comes_before_two_of_a_fortnight_ago() -> None:
    rows = [("ben", "lamp", pd.Timedelta(days=14)), ("cat", "lamp", pd.Timedelta(days=14)),
            ("dan", "rug", pd.Timedelta(hours=2))]
    assert _friends_bought_order(rows, {}) == ["rug", "lamp"]


def test_a_buyer_whose_shares_nobody_opens_counts_for_little() -> None:
    rows = [("ben", "lamp", pd.Timedelta(hours=1)), ("cat", "rug", pd.Timedelta(hours=3))]
    assert _friends_bought_order(rows, {}) == ["lamp", "rug"]  # the newer first when both are usual sharers
    assert _friends_bought_order(rows, {"ben": 0.06}) == ["rug", "lamp"]
