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
from features.social_state import friend_activity
from features.state import build_state, cell_values
from features.weights import CONVERSION_TYPES
from training.evaluate import Targets, bootstrap_ratio, holdout_targets, per_user_metrics, score_lists
from training.params import TrainParams
from training.ranker import Ranker, RankerData, fit_ranker, sample_negatives, with_positive_groups
from training.twostage import (
    UNION_SIZE,
    TwoStageResult,
    blank_social,
    compose_all,
    held_out_users,
    per_user_lists,
    ranked_rows,
    stack,
    training_groups,
    without_social,
)
from training.window import (
    CandidateRows,
    Window,
    attach_labels,
    blocked_matrix,
    bought_matrix,
    candidate_rows,
    labels_between,
)

Groups = list[tuple[CandidateRows, np.ndarray]]  # candidate rows and their labels, one entry per label period
TRAINING_MODES = ("static", "replay", "stacked")


@dataclass(frozen=True, slots=True)
class ReplayTraining:
    rankers: dict[str, Ranker]  # per ranker, the one kept on validation
    modes: dict[str, str]  # per ranker, how the kept one was trained: one of TRAINING_MODES
    groups: dict[str, Groups]  # the label periods' request-time groups of "ranker", kept for the bundle's refit
    notes: dict[str, float | str]  # validation scores per mode, groups, cost


@dataclass(frozen=True, slots=True)
class ReplayResult:
    rows: dict[str, dict[str, float]]  # model -> metrics over (user, slice) groups
    summary: dict[str, float | str]  # ratio of social over no-social with its interval, groups, cost
    training: ReplayTraining | None = None  # how the rankers were trained, when request-time training ran


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


def _sampled(starts: list[pd.Timestamp], params: TrainParams, period: int = 0) -> list[pd.Timestamp]:
    """At most `replay_max_slices` of the slices, drawn with the replay seed, in time order; label periods
    before window A's (`period` > 0) draw with their own seed, so they do not all keep the same hours."""
    limit = params.evaluation.replay_max_slices
    if len(starts) <= limit:
        return starts
    seed = params.evaluation.replay_seed if not period else [params.evaluation.replay_seed, period]
    picked = np.random.default_rng(seed).choice(len(starts), limit, replace=False)
    return [starts[p] for p in np.sort(picked).tolist()]


def replay_label_groups(window: Window, events: pd.DataFrame, end: pd.Timestamp, params: TrainParams,
                        social: pd.DataFrame | None, names: tuple[str, ...] = ("ranker", "ranker_no_social"),
                        period: int = 0) -> dict[str, Groups]:
    """Ranker groups the request-time way over [window.cutoff, end): per slice, the known users who buy or
    cart in it, candidates and features as of the slice start, labels from the slice; for the social and
    the no-social ranker (candidates of `without_social`, social columns blank), from the same states."""
    hours = params.evaluation.replay_hours
    known = known_events(events, window)
    settings = {"ranker": params, "ranker_no_social": without_social(params)}
    out: dict[str, Groups] = {name: [] for name in names}
    for start in _sampled(slice_starts(window.cutoff, end, hours), params, period):
        labels = labels_between(events, start, min(start + pd.Timedelta(hours=hours), end))  # never past `end`
        users = sorted(u for u in labels["user_id"].unique().tolist() if u in window.users)
        if not users:
            continue
        current = window_as_of(window, known, start, params, social)
        for name in names:
            rows = candidate_rows(current, users, settings[name], UNION_SIZE)
            if name == "ranker_no_social" or not params.ranker.social:
                blank_social(rows)
            out[name].append((rows, attach_labels(rows, current, labels)))
    return out


def _group_ndcg(ranker: Ranker, data: RankerData, k: int) -> float:
    """Mean NDCG@k of the ranker's order within each group, graded by the labels (purchase 2, cart 1)."""
    if not len(data.group_sizes):
        return float("nan")
    scores = ranker.predict(data.features)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values, start = [], 0
    for size in data.group_sizes.tolist():
        labels, group = data.labels[start : start + size], scores[start : start + size]
        start += size
        gains = (2.0 ** labels[np.argsort(-group, kind="stable")][:k]) - 1.0
        ideal = (2.0 ** np.sort(labels)[::-1][:k]) - 1.0
        values.append(float((gains * discounts[: len(gains)]).sum() / (ideal * discounts[: len(ideal)]).sum()))
    return float(np.mean(values))


def train_replay_rankers(two_stage: TwoStageResult, events: pd.DataFrame, end: pd.Timestamp, params: TrainParams,
                         social: pd.DataFrame | None, say: Callable[[str], None],
                         keep_groups: bool = False) -> ReplayTraining:
    """Per ranker, the static one of window A or one trained on the request-time groups of the label periods
    (window A's, and with `ranker.label_windows` > 1 the earlier ones, each with its own window's models;
    alone or stacked with the static groups), whichever has the best NDCG@max(K) on the request-time groups
    of the users held out for early stopping. The same procedure and held-out users for both rankers."""
    replay: dict[str, Groups] = {"ranker": [], "ranker_no_social": []}
    for period, (window, _, period_end) in enumerate(two_stage.label_periods):  # window A's first, then earlier
        for name, groups in replay_label_groups(window, events, min(period_end, end), params, social,
                                                period=period).items():
            replay[name] += groups
    held = held_out_users(two_stage.label_groups["ranker"], params,
                          np.random.default_rng(params.ranker.seed))  # the static rankers' own draw
    k = max(params.evaluation.k)
    chosen: dict[str, Ranker] = {}
    modes: dict[str, str] = {}
    notes: dict[str, float | str] = {}
    for name, own in (("ranker", params), ("ranker_no_social", without_social(params))):
        valid = [with_positive_groups(rows.features, labels, rows.group_sizes,
                                      np.asarray([held.get(u, False) for u in rows.user_ids], dtype=bool))
                 for rows, labels in replay[name]]
        valid_data = stack(valid)
        candidates = {"static": two_stage.rankers[name]}
        for mode, groups in (("replay", replay[name]), ("stacked", [*two_stage.label_groups[name], *replay[name]])):
            train, stop = training_groups(groups, own, np.random.default_rng(params.ranker.seed), held)
            candidates[mode] = fit_ranker(train, own.ranker, stop)
        scores = {mode: _group_ndcg(ranker, valid_data, k) for mode, ranker in candidates.items()}
        best = max(TRAINING_MODES, key=lambda mode: scores[mode])
        chosen[name], modes[name] = candidates[best], best
        notes[f"{name}_training"] = best
        notes |= {f"{name}_valid_ndcg_{mode}": value for mode, value in scores.items()}
        say(f"{name} for replay: validation NDCG@{k} on {len(valid_data.group_sizes):,} request-time groups "
            + ", ".join(f"{mode} {scores[mode]:.4f} ({candidates[mode].rounds} rounds)" for mode in TRAINING_MODES)
            + f": keeps {best}")
    notes["train_groups"] = float(sum(len(rows.user_ids) for rows, _ in replay["ranker"]))
    kept = {"ranker": replay["ranker"]} if keep_groups else {}  # only the bundle's refit reads them
    return ReplayTraining(chosen, modes, kept, notes)


def serving_ranker(two_stage: TwoStageResult, replay: ReplayResult | None, events: pd.DataFrame,
                   params: TrainParams, social: pd.DataFrame | None) -> tuple[Ranker, str]:
    """The social ranker for the bundle and how it was trained: the static refit of the two-stage
    evaluation (`two_stage.ranker`) unless request-time training kept a request-time trained one.

    As the static ranker is refit on window B's groups plus those of the label periods (window A's and any
    earlier ones), for the rounds chosen on A, the request-time one is refit on the request-time groups of
    window B (slices of [T2, end)) plus the label periods', with the static groups of all of them added when
    the kept one was stacked: serving reads a state that moves with every event, which is what these groups
    were built as."""
    training = replay.training if replay is not None else None
    mode = training.modes["ranker"] if training is not None else "static"
    if training is None or mode == "static":
        return two_stage.ranker, "static"
    if "ranker" not in training.groups:
        raise ValueError("the request-time groups were not kept: run_replay(..., keep_groups=True)")
    end = events["ts"].max() + pd.Timedelta(1, "ns")
    later = replay_label_groups(two_stage.test_window, events, end, params, social, names=("ranker",))["ranker"]
    rng = np.random.default_rng(params.ranker.seed)
    parts = [sample_negatives(with_positive_groups(rows.features, labels, rows.group_sizes),
                              params.ranker.negatives_per_group, rng)
             for rows, labels in [*training.groups["ranker"], *later]]
    if mode == "stacked":
        parts.append(two_stage.serving_data)
    data = stack(parts)
    if not len(data.group_sizes):
        return two_stage.ranker, "static"
    return fit_ranker(data, params.ranker, rounds=training.rankers["ranker"].rounds), mode


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
    [window.cutoff, end); None (with a message) when no known user buys in the sampled slices."""
    hours = params.evaluation.replay_hours
    starts = slice_starts(window.cutoff, end, hours)
    test = events.loc[events["ts"] >= window.cutoff]
    sampled = len(starts) > params.evaluation.replay_max_slices
    starts = _sampled(starts, params)
    known = known_events(events, window)
    plain = without_social(params)
    n, k = max(params.evaluation.k), max(params.evaluation.k)
    lists: dict[str, list[np.ndarray]] = {"ranker": [], "ranker_no_social": [], "repeat": []}
    parts: list[Targets] = []
    shared: list[bool] = []  # per group: a target item was shared to the buyer before the slice start
    friend_bought: list[bool] = []  # per group: a friend bought a target item in the week before the slice start
    state_seconds = rows_seconds = 0.0
    for start in starts:
        started = time.perf_counter()
        current = window_as_of(window, known, start, params, social)
        state_seconds += time.perf_counter() - started
        targets = slice_targets(test, current, min(start + pd.Timedelta(hours=hours), end), params.weights)
        if not len(targets.user_ids):
            continue
        parts.append(targets)
        shared += [bool((cell_values(current.state.pair_shared_last, np.full(len(t), u), t) > 0).any())
                   for u, t in zip(targets.user_idx.tolist(), targets.items, strict=True)]
        friend_bought += friends_bought_targets(current, targets, start - pd.Timedelta(days=FRIEND_DAYS))
        users = [str(u) for u in targets.user_ids]
        everyone = np.ones(len(users), dtype=bool)
        rows = candidate_rows(current, users, params, UNION_SIZE)
        rows_plain = candidate_rows(current, users, plain, UNION_SIZE)
        rows_seconds += rows.seconds + rows_plain.seconds
        blank_social(rows_plain)
        if not params.ranker.social:
            blank_social(rows)
        for name, scored in (("ranker", rows), ("ranker_no_social", rows_plain)):
            ranked = ranked_rows(scored, rankers[name].predict(scored.features))
            lists[name] += compose_all(current, targets, n, per_user_lists(Source.ALS, ranked, everyone))
        lists["repeat"] += compose_all(current, targets, n, per_user_lists(Source.REPEAT, rows.per_source["repeat"]))
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
    with_share, with_friend = np.asarray(shared, dtype=bool), np.asarray(friend_bought, dtype=bool)
    # Where a fresh social signal points at what the buyer bought: does the social ranker use it, and what
    # does it cost where none does?
    for kind, mask in (("shared", with_share), ("friend_bought", with_friend & ~with_share),
                       ("no_social", ~with_share & ~with_friend)):
        summary[f"groups_{kind}"] = float(mask.sum())
        if mask.any():
            summary[f"ranker_ndcg_{kind}"] = float(ours[mask].mean())
            summary[f"ranker_no_social_ndcg_{kind}"] = float(theirs[mask].mean())
    return ReplayResult(result, summary)


FRIEND_DAYS = 7  # "a friend bought it" for the replay's breakdown: in the week before the slice start
GROUP_KINDS = {
    "shared": "a bought item had been shared to the buyer before the slice start",
    "friend_bought": f"(of the others) a friend had bought a bought item in the {FRIEND_DAYS} days before it",
    "no_social": "neither",
}


def friends_bought_targets(window: Window, targets: Targets, since: pd.Timestamp) -> list[bool]:
    """Per target group: did someone the buyer sees buy one of its items at or after `since` (as of the
    window's state)?"""
    sizes = [len(t) for t in targets.items]
    if not sum(sizes):
        return [False] * len(sizes)
    rows = np.repeat(targets.user_idx, sizes)
    (activity,) = friend_activity(window.state.user_sees, [window.state.social.bought_cells], rows,
                                  np.concatenate(targets.items), (since.timestamp(),))
    hit = activity.counts[:, 0] > 0
    ends = np.cumsum(sizes)
    return [bool(hit[end - size : end].any()) for size, end in zip(sizes, ends.tolist(), strict=True)]


def unsliceable(events: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, hours: float) -> str | None:
    """Why [start, end) cannot be replayed in `hours` slices (fewer distinct times than slices), or None."""
    slices = len(slice_starts(start, end, hours))
    times = events.loc[(events["ts"] >= start) & (events["ts"] < end), "ts"].nunique()
    if times < slices:
        return (f"the test window holds {times:,} distinct times for {slices:,} slices of {hours:g} h "
                "(its events are bucketed, not timed)")
    return None


def run_replay(two_stage: TwoStageResult, events: pd.DataFrame, params: TrainParams, social: pd.DataFrame | None,
               say: Callable[[str], None], keep_groups: bool = False) -> ReplayResult | None:
    """Request-time evaluation of the two rankers on window B, after training them the request-time way
    too when `evaluation.replay_training` is on; None (with the reason said) when time cannot be sliced.
    `keep_groups` keeps the label periods' request-time groups of the social ranker for `serving_ranker`."""
    window = two_stage.test_window
    end = events["ts"].max() + pd.Timedelta(1, "ns")
    problem = unsliceable(events, window.cutoff, end, params.evaluation.replay_hours)
    if problem is not None:
        say(f"request-time replay skipped: {problem}")
        return None
    rankers, notes, training = two_stage.rankers, dict[str, float | str](), None
    if params.evaluation.replay_training:
        started = time.perf_counter()
        training = train_replay_rankers(two_stage, events, window.cutoff, params, social, say, keep_groups)
        rankers, notes = training.rankers, training.notes | {"train_seconds": time.perf_counter() - started}
    result = evaluate_replay(window, events, end, rankers, params, social, say)
    if result is None:
        return None
    return ReplayResult(result.rows, result.summary | notes, training)


def replay_lines(rows: dict[str, dict[str, float]], summary: dict[str, float | str]) -> list[str]:
    """What a run prints about replay: groups and cost, the table, the ratio line, the shared-item groups."""
    r = summary
    lines = [
        f"request-time replay: {int(r['groups']):,} (user, slice) groups in {int(r['slices_with_groups'])} of "
        f"{int(r['slices'])} slices of {float(r['hours']):g} h (sampled: {r['sampled']}); state "
        f"{float(r['state_seconds_per_slice']):.1f} s per slice, candidate rows "
        f"{1000 * float(r['rows_seconds_per_group']):.1f} ms per group (both rankers); rankers trained "
        f"{r.get('ranker_training', 'static')} / {r.get('ranker_no_social_training', 'static')}",
        pd.DataFrame.from_dict(rows, orient="index").round(4).to_string(),
        f"ranker_replay / ranker_no_social_replay NDCG@{r['k']}: {float(r['ratio']):.3f} "
        f"(95% interval {float(r['ci_low']):.3f} - {float(r['ci_high']):.3f})",
    ]
    for kind, what in GROUP_KINDS.items():
        if f"ranker_ndcg_{kind}" in r:
            lines.append(
                f"groups where {what}: {int(r[f'groups_{kind}']):,}; NDCG@{r['k']} there "
                f"{float(r[f'ranker_ndcg_{kind}']):.4f} (ranker) vs {float(r[f'ranker_no_social_ndcg_{kind}']):.4f}"
                " (ranker_no_social)")
    return lines
