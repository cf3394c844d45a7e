"""An erasure recorded in the event log keeps the user out of the next training set."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from features.dataset import load_dataset
from features.eventlog import EventLog, erase_row
from features.weights import DEFAULT_EVENT_WEIGHTS


def test_training_data_leaves_out_erased_users(tmp_path: Path) -> None:
    pd.DataFrame({
        "user_id": ["u1", "u2", "u1", "u3"], "item_id": ["a", "b", "c", "a"],
        "event_type": ["view", "purchase", "purchase", "view"],
        "timestamp": ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z",
                      "2026-01-04T00:00:00Z"],
    }).to_csv(tmp_path / "events.csv", index=False)
    pd.DataFrame({"user_id": ["u1", "u2", "u3"], "friend_id": ["u2", "u3", "u1"], "kind": "friend"}).to_csv(
        tmp_path / "social.csv", index=False)
    with EventLog(tmp_path) as log:  # the service's log, pointed at the data directory
        log.append([{"event_id": "x1", "user_id": "u1", "item_id": "b", "event_type": "view",
                     "timestamp": "2026-01-05T00:00:00Z"}])
        before = load_dataset(tmp_path, DEFAULT_EVENT_WEIGHTS)
        assert sorted(before.events["user_id"]) == ["u1", "u1", "u1", "u2", "u3"]
        log.append([erase_row("u1", time.time())])
    after = load_dataset(tmp_path, DEFAULT_EVENT_WEIGHTS)
    assert sorted(after.events["user_id"]) == ["u2", "u3"]
    assert after.erased_events == 3
    assert after.social is not None
    assert list(zip(after.social["user_id"], after.social["friend_id"], strict=True)) == [("u2", "u3")]


def test_other_users_rows_keep_their_place_without_the_erased_users_id(tmp_path: Path) -> None:
    pd.DataFrame({
        "user_id": ["u2", "u3", "u3"], "item_id": ["a", "a", "b"], "event_type": ["share", "purchase", "view"],
        "timestamp": ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"],
        "target_user_id": ["u1", None, None], "referrer_id": [None, "u1", "u2"],
    }).to_csv(tmp_path / "events.csv", index=False)
    with EventLog(tmp_path) as log:
        log.append([erase_row("u1", time.time())])
    events = load_dataset(tmp_path, DEFAULT_EVENT_WEIGHTS).events
    assert events["user_id"].tolist() == ["u2", "u3", "u3"]  # their share and their purchase still count
    assert events["target_user_id"].isna().all()
    assert events["referrer_id"].isna().tolist() == [True, True, False]
    assert events["referrer_id"].iloc[2] == "u2"
