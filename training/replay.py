"""Request-time ("replay") evaluation: the test window scored slice by slice, as a storefront sees it.

Serving keeps its models fit at the bundle's cut-off but reads an online state that moves with every
event. Replay does the same offline: for each slice [t_s, t_s + H) of the test window the feature state,
blocked items and popular lists are rebuilt from the events before t_s (the candidate models stay as fit
at T2), and each known user who buys in the slice is one group, with the slice's purchases as targets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from features.candidates import PopularLists
from features.feed import Source
from features.state import build_state
from features.weights import CONVERSION_TYPES
from training.evaluate import Targets, bootstrap_ratio, holdout_targets, per_user_metrics, score_lists
from training.params import TrainParams
from training.ranker import Ranker
from training.twostage import UNION_SIZE, _blank_social, _compose_all, _per_user, _ranked_rows, without_social
from training.window import Window, blocked_matrix, bought_matrix, candidate_rows


@dataclass(frozen=True, slots=True)
class ReplayResult:
    rows: dict[str, dict[str, float]]  # model -> metrics over (user, slice) groups
    summary: dict[str, float | str]  # ratio of social over no-social with its interval, groups, cost


def known_events(events: pd.DataFrame, window: Window) -> pd.DataFrame:
    """The events whose user and item the window knows (`build_state` drops the others), in time order."""
    keep = (window.users.indexes(events["user_id"]) >= 0) & (window.items.indexes(events["item_id"]) >= 0)
    return events.loc[keep].sort_values("ts", kind="stable").reset_index(drop=True)


def window_as_of(window: Window, events: pd.DataFrame, at: pd.Timestamp, params: TrainParams,
                 social: pd.DataFrame | None) -> Window:
    """`window` with its state, popular lists and blocked items as of `at`: the models stay as fit."""
    past = events.loc[events["ts"] < at]
    state = build_state(past, window.users, window.items, window.item_meta, params.weights, at,
                        window.categories, window.brands, social)
    blocked = blocked_matrix(bought_matrix(past, window.users, window.items), window.item_meta, window.policy)
    return replace(window, cutoff=at, state=state, lists=PopularLists.from_state(state), blocked=blocked)


def slice_starts(start: pd.Timestamp, end: pd.Timestamp, hours: float) -> list[pd.Timestamp]:
    """Starts of the H-hour slices covering [start, end]."""
    step = pd.Timedelta(hours=hours)
    count = max(math.ceil((end - start) / step), 1)
    return [start + k * step for k in range(count)]


def slice_targets(events: pd.DataFrame, window: Window, end: pd.Timestamp, weights: dict[str, float]) -> Targets:
    """Known users who buy in [window.cutoff, end) and what they buy; items blocked as of the slice start
    (bought before, not to be offered again) are not targets."""
    bought = events.loc[(events["ts"] >= window.cutoff) & (events["ts"] < end)
                        & events["event_type"].isin(CONVERSION_TYPES)]
    targets = holdout_targets(bought, window.users, window.items, weights)
    keep = np.flatnonzero(targets.user_idx >= 0)
    items, counts = [], []
    blocked = window.blocked
    for position in keep.tolist():
        user = int(targets.user_idx[position])
        wanted = targets.items[position]
        allowed = ~np.isin(wanted, blocked.indices[blocked.indptr[user] : blocked.indptr[user + 1]])
        items.append(wanted[allowed])
        counts.append(int(targets.n_targets[position]) - int((~allowed).sum()))
    has = np.asarray(counts, dtype=np.int64) > 0
    chosen = keep[has]
    return replace(
        targets,
        user_ids=targets.user_ids[chosen],
        user_idx=targets.user_idx[chosen],
        items=[t for t, h in zip(items, has.tolist(), strict=True) if h],
        n_targets=np.asarray(counts, dtype=np.int64)[has],
    )


def _concat(parts: list[Targets]) -> Targets:
    """The (user, slice) groups of every slice as one target set."""
    return Targets(
        user_ids=np.concatenate([p.user_ids for p in parts]),
        user_idx=np.concatenate([p.user_idx for p in parts]),
        items=[t for p in parts for t in p.items],
        n_targets=np.concatenate([p.n_targets for p in parts]),
        target_kind="purchase",
        unseen_item_share=0.0,
        cold_user_share=0.0,
    )


def evaluate_replay(
    window: Window,
    events: pd.DataFrame,
    end: pd.Timestamp,
    rankers: dict[str, Ranker],
    params: TrainParams,
    social: pd.DataFrame | None,
    say: Callable[[str], None],
) -> ReplayResult | None:
    """Score `rankers` ("ranker": social, "ranker_no_social") and `repeat` per (user, slice) over
    [window.cutoff, end]; None (with a message) when the test window's times cannot be sliced."""
    hours = params.evaluation.replay_hours
    starts = slice_starts(window.cutoff, end, hours)
    test = events.loc[events["ts"] >= window.cutoff]
    if test["ts"].nunique() < len(starts):
        say(f"replay skipped: the test window has {test['ts'].nunique():,} distinct times for {len(starts):,} "
            f"slices of {hours:g} h (time buckets, not event times)")
        return None
    sampled = len(starts) > params.evaluation.replay_max_slices
    if sampled:
        rng = np.random.default_rng(params.evaluation.replay_seed)
        picked = np.sort(rng.choice(len(starts), params.evaluation.replay_max_slices, replace=False))
        starts = [starts[p] for p in picked.tolist()]
    known = known_events(events, window)
    plain = without_social(params)
    n, k = max(params.evaluation.k), max(params.evaluation.k)
    lists: dict[str, list[np.ndarray]] = {"ranker": [], "ranker_no_social": [], "repeat": []}
    parts: list[Targets] = []
    state_seconds = rows_seconds = 0.0
    for start in starts:
        started = time.perf_counter()
        current = window_as_of(window, known, start, params, social)
        state_seconds += time.perf_counter() - started
        targets = slice_targets(test, current, start + pd.Timedelta(hours=hours), params.weights)
        if not len(targets.user_ids):
            continue
        parts.append(targets)
        users = [str(u) for u in targets.user_ids]
        everyone = np.ones(len(users), dtype=bool)
        rows = candidate_rows(current, users, params, UNION_SIZE)
        rows_plain = candidate_rows(current, users, plain, UNION_SIZE)
        rows_seconds += rows.seconds + rows_plain.seconds
        _blank_social(rows_plain)
        if not params.ranker.social:
            _blank_social(rows)
        for name, scored in (("ranker", rows), ("ranker_no_social", rows_plain)):
            ranked = _ranked_rows(scored, rankers[name].predict(scored.features))
            lists[name] += _compose_all(current, targets, n, _per_user(Source.ALS, ranked, everyone))
        lists["repeat"] += _compose_all(current, targets, n, _per_user(Source.REPEAT, rows.per_source["repeat"]))
    if not parts:
        say("replay skipped: no known user bought anything in the sampled slices")
        return None
    targets = _concat(parts)
    result = {f"{name}_replay": score_lists(model_lists, targets, params.evaluation.k, len(window.items))
              for name, model_lists in lists.items()}
    ours = per_user_metrics(lists["ranker"], targets, k)
    theirs = per_user_metrics(lists["ranker_no_social"], targets, k)
    low, mid, high = bootstrap_ratio(ours, theirs, np.random.default_rng(params.evaluation.replay_seed))
    summary: dict[str, float | str] = {
        "against": "ranker_no_social_replay", "ratio": mid, "ci_low": low, "ci_high": high, "k": k,
        "hours": hours, "slices": len(starts), "slices_with_groups": len(parts), "groups": len(targets.user_ids),
        "sampled": "yes" if sampled else "no", "state_seconds_per_slice": state_seconds / len(starts),
        "rows_seconds_per_group": rows_seconds / len(targets.user_ids),
    }
    return ReplayResult(result, summary)
