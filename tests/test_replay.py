"""Request-time replay: a slice's features see every event before its start and nothing at or after it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from features.dataset import load_dataset
from features.ranking import FEATURE_NAMES, SOCIAL_COLUMNS
from tests.event_frames import T0, social_events
from training.bundle import ITEM_META_COLUMNS
from training.evaluate import Targets
from training.params import ALSParams, BPRParams, EvalParams, RankerParams, TrainParams, load_params
from training.ranker import Ranker
from training.replay import (
    GROUP_KINDS,
    _sampled,
    friends_bought_targets,
    known_events,
    replay_label_groups,
    run_replay,
    serving_ranker,
    slice_starts,
    slice_targets,
    unsliceable,
    window_as_of,
)
from training.split import time_holdout
from training.twostage import evaluate_two_stage
from training.window import Window, candidate_rows, fit_window

PARAMS = TrainParams(als=ALSParams(factors=8, iterations=4), bpr=BPRParams(factors=8, iterations=10))


def _slice_rows(window: Window, events: pd.DataFrame, at: pd.Timestamp, users: list[str],
                social: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    current = window_as_of(window, known_events(events, window), at, PARAMS, social)
    rows = candidate_rows(current, users, PARAMS, 120)
    return rows.features, window.items.ids[rows.items], rows.group_sizes


@pytest.mark.parametrize("seed", [1, 2])
def test_moving_every_event_at_or_after_the_slice_start_changes_no_feature(demo_dir: Path, seed: int) -> None:
    data = load_dataset(demo_dir, PARAMS.weights.keys())
    events = data.events
    cut = events["ts"].quantile(0.8).floor("D")  # window B's cut-off (T2): the models are fit before it
    start = cut + pd.Timedelta(hours=30)  # a slice of the test window
    window = fit_window(events, data.items, PARAMS, cut, ITEM_META_COLUMNS, data.social)
    users = sorted(events.loc[events["ts"] >= start, "user_id"].unique().tolist())
    users = [u for u in users if u in window.users][:60]
    before = _slice_rows(window, events, start, users, data.social)

    rng = np.random.default_rng(seed)
    future = events["ts"] >= start
    moved = events.copy()
    shift = pd.to_timedelta(rng.integers(0, 30 * 86_400, future.sum()), unit="s")
    moved.loc[future, "ts"] = moved.loc[future, "ts"] + shift
    moved.loc[future, "item_id"] = rng.permutation(moved.loc[future, "item_id"].to_numpy())
    moved.loc[future, "event_type"] = rng.choice(["view", "purchase", "add_to_cart", "share"], future.sum())
    for column in ("target_user_id", "referrer_id"):
        moved.loc[future, column] = rng.permutation(moved.loc[future, "user_id"].to_numpy())
    moved = moved.sort_values("ts", kind="stable").reset_index(drop=True)
    after = _slice_rows(window, moved, start, users, data.social)

    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(b, a)
    assert before[0].shape[0] > 0
    # The check can fail: the events between T2 and the slice start do reach the slice's features.
    at_cut = _slice_rows(window, events, cut, users, data.social)
    assert at_cut[0].shape != before[0].shape or not np.array_equal(at_cut[0], before[0], equal_nan=True)


CATALOG = pd.DataFrame({"item_id": pd.Series([f"i{k}" for k in range(8)], dtype="str"),
                        "category": pd.Series([f"c{k % 2}" for k in range(8)], dtype="str")})


def _world(share_day: float) -> pd.DataFrame:
    """Twelve users and eight items over ten days; u1 shares i7 with u0 at `share_day`."""
    rows: list[tuple[str, str, str, float, str | None, str | None]] = []
    for u in range(12):
        for d in range(10):
            item = f"i{(u + d) % 6}"
            rows.append((f"u{u}", item, "view", d + u / 24, None, None))
            if d % 3 == 0:
                rows.append((f"u{u}", item, "purchase", d + u / 24 + 0.01, None, None))
    rows.append(("u5", "i7", "view", 2.0, None, None))
    rows.append(("u1", "i7", "share", share_day, "u0", None))
    rows.append(("u2", "i6", "purchase", 10.5, None, None))  # after the cut: the test window's first buy
    rows.sort(key=lambda r: r[3])
    return social_events(rows)


@pytest.mark.parametrize(("share_hours", "proposed"), [(1.0, True), (3.0, False)])
def test_a_share_received_before_the_slice_start_makes_the_item_a_candidate(share_hours: float,
                                                                          proposed: bool) -> None:
    cut = T0 + pd.Timedelta(days=10)
    events = _world(10 + share_hours / 24)
    window = fit_window(events, CATALOG, PARAMS, cut, ITEM_META_COLUMNS)
    start = cut + pd.Timedelta(hours=2)
    current = window_as_of(window, known_events(events, window), start, PARAMS, None)
    rows = candidate_rows(current, ["u0"], PARAMS, 120)
    gift = window.items.index_of("i7")
    assert (gift in rows.per_source["shared"][0].tolist()) is proposed
    shared_days = rows.features[:, FEATURE_NAMES.index("pair_shared_days")][rows.items == gift]
    if proposed:
        assert shared_days[0] == pytest.approx(1 / 24, abs=1e-6)  # one hour old at the slice start
    else:  # the tiny catalog puts every item in the union: the feature shows the share was not seen
        assert np.isnan(shared_days).all()
    # As of the cut itself (the static evaluation), the share is never visible.
    static = candidate_rows(window, ["u0"], PARAMS, 120)
    assert gift not in static.per_source["shared"][0].tolist()
    assert set(SOCIAL_COLUMNS) <= set(FEATURE_NAMES)


def test_the_breakdown_knows_which_buyers_saw_a_friend_buy_the_item_that_week() -> None:
    cut = T0 + pd.Timedelta(days=10)
    window = fit_window(_world(5.0), CATALOG, PARAMS, cut, ITEM_META_COLUMNS)  # u0 sees u1, who shared to them
    index = window.items.index_of
    user = window.users.index_of("u0")
    targets = Targets(user_ids=np.asarray(["u0"] * 3), user_idx=np.full(3, user),
                      items=[np.asarray([index("i2"), index("i4")]), np.asarray([index("i2")]), np.asarray([])],
                      n_targets=np.asarray([2, 1, 1]), target_kind="purchase", unseen_item_share=0.0,
                      cold_user_share=0.0)
    # u1 bought i4 on day 9 and i1 on day 6, and never i2.
    assert friends_bought_targets(window, targets, cut - pd.Timedelta(days=7)) == [True, False, False]
    assert friends_bought_targets(window, targets, cut - pd.Timedelta(hours=12)) == [False, False, False]


def test_slice_targets_are_the_slice_purchases_of_known_users_without_blocked_items() -> None:
    cut = T0 + pd.Timedelta(days=10)
    events = _world(5.0)
    extra = social_events([
        ("u3", "i6", "purchase", 10.6, None, None),
        ("u4", "i0", "purchase", 10.6, None, None),
        ("newcomer", "i1", "purchase", 10.6, None, None),  # unknown to the window: not a group
        ("u3", "i2", "purchase", 11.0, None, None),  # after the slice
    ])
    events = pd.concat([events, extra], ignore_index=True).sort_values("ts", kind="stable")
    window = fit_window(events, CATALOG, PARAMS, cut, ITEM_META_COLUMNS)
    current = window_as_of(window, known_events(events, window), cut + pd.Timedelta(hours=12), PARAMS, None)
    blocked = current.blocked.tolil()
    blocked[window.users.index_of("u4"), window.items.index_of("i0")] = 1.0  # as if the policy forbade it again
    current = replace(current, blocked=blocked.tocsr())
    targets = slice_targets(events, current, cut + pd.Timedelta(hours=16), PARAMS.weights)
    found = {str(u): sorted(window.items.ids[t].tolist()) for u, t in zip(targets.user_ids, targets.items,
                                                                           strict=True)}
    assert found == {"u2": ["i6"], "u3": ["i6"]}


def test_slices_cover_the_window_and_replay_needs_the_ablation(tmp_path: Path) -> None:
    starts = slice_starts(T0, T0 + pd.Timedelta(hours=7), 3.0)
    assert starts == [T0, T0 + pd.Timedelta(hours=3), T0 + pd.Timedelta(hours=6)]
    with pytest.raises(ValidationError):
        EvalParams(replay_hours=2.0)
    params = TrainParams(evaluation=EvalParams(social_ablation=True, replay_hours=2.0))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    assert load_params(path) == params


def test_bucketed_times_cannot_be_replayed() -> None:
    end = T0 + pd.Timedelta(days=2)
    bucketed = social_events([("u0", "i0", "purchase", 0, None, None), ("u1", "i1", "purchase", 1, None, None)])
    problem = unsliceable(bucketed, T0, end, 2.0)
    assert problem is not None
    assert "2 distinct times for 24 slices" in problem
    timed = social_events([(f"u{k}", "i0", "view", k / 24, None, None) for k in range(48)])
    assert unsliceable(timed, T0, end, 2.0) is None


def test_the_bundle_ranker_is_trained_the_way_replay_kept(demo_dir: Path) -> None:
    params = PARAMS.model_copy(update={"evaluation": EvalParams(social_ablation=True, replay_hours=6.0,
                                                                replay_max_slices=6)})
    data = load_dataset(demo_dir, params.weights.keys())
    holdout = time_holdout(data.events, params.split)
    two_stage = evaluate_two_stage(data.events, data.items, holdout, params, ITEM_META_COLUMNS, lambda _: None,
                                   social=data.social)
    result = run_replay(two_stage, data.events, params, data.social, lambda _: None, keep_groups=True)
    assert result is not None
    training = result.training
    assert training is not None
    assert training.modes["ranker"] in ("static", "replay", "stacked")
    assert training.groups["ranker"], "window A gave request-time groups"
    assert sum(result.summary[f"groups_{kind}"] for kind in GROUP_KINDS) == result.summary["groups"]

    def served(mode: str) -> tuple[Ranker, str]:
        kept = replace(result, training=replace(training, modes={**training.modes, "ranker": mode}))
        return serving_ranker(two_stage, kept, data.events, params, data.social)

    assert serving_ranker(two_stage, None, data.events, params, data.social) == (two_stage.ranker, "static")
    assert served("static") == (two_stage.ranker, "static")  # the two-stage evaluation's static refit
    (request_time, mode_a), (stacked, mode_b) = served("replay"), served("stacked")
    assert (mode_a, mode_b) == ("replay", "stacked")
    assert request_time.rounds == stacked.rounds == training.rankers["ranker"].rounds
    rows = two_stage.serving_data.features
    scores = [r.predict(rows) for r in (two_stage.ranker, request_time, stacked)]
    assert not np.allclose(scores[0], scores[1])
    assert not np.allclose(scores[1], scores[2])


def test_request_time_training_slices_every_label_window(demo_dir: Path) -> None:
    replay = EvalParams(social_ablation=True, replay_hours=6.0, replay_max_slices=4)
    data = load_dataset(demo_dir, PARAMS.weights.keys())
    groups = []
    for windows in (1, 2):
        params = PARAMS.model_copy(update={"evaluation": replay, "ranker": RankerParams(label_windows=windows)})
        two_stage = evaluate_two_stage(data.events, data.items, time_holdout(data.events, params.split), params,
                                       ITEM_META_COLUMNS, lambda _: None, social=data.social)
        assert [cut for _, cut, _ in two_stage.label_periods] == sorted(
            (cut for _, cut, _ in two_stage.label_periods), reverse=True)
        result = run_replay(two_stage, data.events, params, data.social, lambda _: None, keep_groups=True)
        assert result is not None
        assert result.training is not None
        groups.append(len(result.training.groups["ranker"]))
    assert groups[0] <= 4 < groups[1] <= 8  # four sampled slices per label period, each with buyers or not

    # The earlier period: its window's models and state stop at its start, its labels at its end.
    (window_a, start_a, end_a), (earlier, start, end) = two_stage.label_periods
    assert (earlier.cutoff, end) == (start, start_a)
    assert window_a.cutoff == start_a
    events = data.events
    bought = events.loc[(events["ts"] >= start) & (events["ts"] < end)
                        & events["event_type"].isin(["purchase", "add_to_cart"])]
    allowed = set(zip(bought["user_id"], bought["item_id"], strict=True))
    labelled = set()
    for rows, labels in replay_label_groups(earlier, events, end, params, data.social, names=("ranker",),
                                            period=1)["ranker"]:
        users = np.repeat(np.asarray(rows.user_ids), rows.group_sizes)
        positive = labels > 0
        labelled |= set(zip(users[positive].tolist(), earlier.items.ids[rows.items[positive]].tolist(), strict=True))
    assert labelled
    assert labelled <= allowed
    # Each period draws its own slices: not the same hours as window A's.
    hours = params.evaluation.replay_hours
    offsets = [[s - first for s in _sampled(slice_starts(first, last, hours), params, period)]
               for period, (first, last) in enumerate([(start_a, end_a), (start, end)])]
    assert offsets[0] != offsets[1]
