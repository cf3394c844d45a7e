"""The two-stage recommender's evaluation on three windows, against the baselines, in one run.

Window A (fit before T1, labels in [T1, T2)) trains the ranker and picks the best popularity window;
window B (fit before T2, labels in [T2, T3)) is the reported test: every baseline and the ranker are
scored on the same users with the same blocked items. With `ranker.label_windows` > 1, window A's groups
are stacked with those of the windows before it (each fit as of its own cut-off, labels before T1). The
ranker that serving gets is then refit on window B's rows plus those groups, for the rounds chosen on A.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from features.attribution import attribute
from features.candidates import factor_scores, top_scores
from features.feed import Candidates, Source, compose_feed
from features.propensity import PropensityModel
from features.ranking import FEATURE_NAMES, SOCIAL_COLUMNS
from features.social_state import friends_of
from features.state import ITEM_WINDOWS_DAYS
from training.evaluate import (
    EvalReport,
    Targets,
    bootstrap_ratio,
    holdout_targets,
    metric_curves,
    per_user_metrics,
    score_lists,
)
from training.params import TrainParams
from training.propensity import fit_propensity
from training.ranker import Ranker, RankerData, fit_ranker, sample_negatives, with_positive_groups
from training.split import Holdout, validation_cut
from training.window import CandidateRows, Window, attach_labels, candidate_rows, fit_window, labels_between

UNION_SIZE = 250
BASELINE_SOURCES = ("als", "bpr", "item_knn", "repeat")


@dataclass(frozen=True, slots=True)
class TwoStageResult:
    report: EvalReport
    ranker: Ranker  # refit on window B, for the bundle
    windows: dict[str, str]  # T0..T3 as ISO text, for the manifest
    popularity_window: str
    propensity: dict[str, PropensityModel]  # segments' model per target kind, fitted on window A
    test_window: Window  # window B: models fit at T2, the starting point of request-time replay
    rankers: dict[str, Ranker]  # trained on window A: "ranker" and, with the ablation, "ranker_no_social"
    # Window A and the windows before it (`ranker.label_windows`), each with its label period [start, end):
    # request-time training slices these periods; label_groups holds each ranker's static groups of them.
    label_periods: list[tuple[Window, pd.Timestamp, pd.Timestamp]]
    label_groups: dict[str, list[tuple[CandidateRows, np.ndarray]]]
    serving_data: RankerData  # the sampled groups `ranker` was refit on (window B's and window A's)


def _popularity_scores(window: Window, name: str) -> np.ndarray:
    state = window.state
    if name == "trending":
        return state.item_trending
    column = [f"{d}d" for d in ITEM_WINDOWS_DAYS].index(name) if name != "all" else len(ITEM_WINDOWS_DAYS)
    return state.item_window_counts[:, column]


def _ranked(scores: np.ndarray, depth: int) -> Candidates:
    order = np.lexsort((np.arange(len(scores)), -scores))
    order = order[scores[order] > 0][:depth]
    return Candidates(Source.POPULAR, order.astype(np.int64), scores[order].astype(np.float32))


def compose_all(
    window: Window, targets: Targets, n: int, chain_for: Callable[[int], list[Candidates]]
) -> list[np.ndarray]:
    """Each target user's list: `chain_for(position)` then the trending fallback, blocked items removed."""
    mask = np.zeros(len(window.items), dtype=bool)
    fallback = _ranked(window.state.item_trending + 1e-6 * window.state.item_buyers, n + 2000)
    out = []
    for position, user in enumerate(targets.user_idx.tolist()):
        blocked = (
            window.blocked.indices[window.blocked.indptr[user] : window.blocked.indptr[user + 1]]
            if user >= 0
            else np.empty(0, dtype=np.int64)
        )
        mask[blocked] = True
        out.append(compose_feed([*chain_for(position), fallback], n, mask).items)
        mask[blocked] = False
    return out


def _shared(chain: list[Candidates]) -> Callable[[int], list[Candidates]]:
    """The same chain for every user (popularity baselines)."""
    return lambda _position: chain


def per_user_lists(
    source: Source, ranked: list[np.ndarray], known: np.ndarray | None = None
) -> Callable[[int], list[Candidates]]:
    """Each user's own ranked list, as one source; users not `known` get the fallback alone (as served)."""

    def chain(position: int) -> list[Candidates]:
        if known is not None and not known[position]:
            return []
        return [Candidates(source, ranked[position], np.zeros(len(ranked[position]), np.float32))]

    return chain


def ranked_rows(rows: CandidateRows, scores: np.ndarray) -> list[np.ndarray]:
    return [rows.items[s][np.argsort(-scores[s], kind="stable")] for s in rows.group_slices()]


def _best_popularity_window(window: Window, targets: Targets, n: int, ks: tuple[int, ...]) -> str:
    """The popularity window with the best NDCG@max(K) on window A (tuning never sees the test)."""
    best, best_score = "trending", -1.0
    for name in [*(f"{d}d" for d in ITEM_WINDOWS_DAYS), "all", "trending"]:
        chain = [_ranked(_popularity_scores(window, name), n + 2000)]
        lists = compose_all(window, targets, n, _shared(chain))
        score = score_lists(lists, targets, ks, len(window.items))[f"ndcg_at_{max(ks)}"]
        if score > best_score:
            best, best_score = name, score
    return best


def _ranker_data(
    window: Window, events: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp | None, params: TrainParams
) -> tuple[CandidateRows, np.ndarray]:
    labels = labels_between(events, start, end)
    users = sorted(labels["user_id"].unique().tolist())
    rows = candidate_rows(window, users, params, UNION_SIZE)
    if not _social_on(params):
        blank_social(rows)
    return rows, attach_labels(rows, window, labels)


def _social_on(params: TrainParams) -> bool:
    return params.ranker.social


def without_social(params: TrainParams) -> TrainParams:
    """The same parameters without the social sources and features (the ablation's model)."""
    return params.model_copy(update={"ranker": params.ranker.model_copy(update={"social": False})})


def blank_social(rows: CandidateRows) -> None:
    """The social feature columns set to missing: a ranker trained on them never splits on them."""
    rows.features[:, [FEATURE_NAMES.index(name) for name in SOCIAL_COLUMNS]] = np.nan


def _social_als(window: Window, targets: Targets, n: int, smoothing: float) -> list[np.ndarray]:
    """ALS with each user's vector smoothed towards the mean vector of the people they see."""
    users = window.models.als_users
    ranked: list[np.ndarray] = []
    mask = np.zeros(len(window.items), dtype=bool)
    for user in targets.user_idx.tolist():
        if user < 0:
            ranked.append(np.empty(0, dtype=np.int64))
            continue
        vector = users[user]
        friends = friends_of(window.state.user_sees, user)
        if len(friends):
            vector = (1.0 - smoothing) * vector + smoothing * users[friends].mean(axis=0)
        blocked = window.blocked.indices[window.blocked.indptr[user] : window.blocked.indptr[user + 1]]
        mask[blocked] = True
        scores = factor_scores(vector[None, :], window.models.als_items, np.zeros(1, dtype=np.int64))[0]
        ranked.append(top_scores(scores, n + 50, mask)[0])
        mask[blocked] = False
    return ranked


def _share_metrics(lists: list[np.ndarray], targets: Targets, bought_via_share: set[tuple[str, int]],
                   k: int) -> dict[str, float]:
    """Of the top-k recommended items, the share later bought through a share or referral; and of those
    purchases (by the evaluated users, of items the window knows), the share recommended."""
    shown = hits = 0
    for user_id, items in zip(targets.user_ids.tolist(), lists, strict=True):
        top = items[:k].tolist()
        shown += len(top)
        hits += sum((str(user_id), int(i)) in bought_via_share for i in top)
    return {f"share_bought_at_{k}": hits / max(shown, 1),
            f"share_recall_at_{k}": hits / max(len(bought_via_share), 1)}


def stack(parts: list[RankerData]) -> RankerData:
    return RankerData(
        np.concatenate([p.features for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.group_sizes for p in parts]),
    )


def held_out_users(
    stacked: list[tuple[CandidateRows, np.ndarray]], params: TrainParams, rng: np.random.Generator
) -> dict[str, bool]:
    """Which users of the label windows are held out for early stopping (drawn once, in user id order)."""
    users = sorted({u for rows, _ in stacked for u in rows.user_ids})
    return dict(zip(users, (rng.random(len(users)) < params.ranker.validation_share).tolist(), strict=True))


def training_groups(
    stacked: list[tuple[CandidateRows, np.ndarray]], params: TrainParams, rng: np.random.Generator,
    held: dict[str, bool] | None = None,
) -> tuple[RankerData, RankerData]:
    """Training and early-stopping groups from every label window; a user is held out in all or none."""
    if held is None:
        held = held_out_users(stacked, params, rng)
    train, valid = [], []
    for rows, labels in stacked:
        valid_groups = np.asarray([held[u] for u in rows.user_ids], dtype=bool)
        train.append(sample_negatives(
            with_positive_groups(rows.features, labels, rows.group_sizes, ~valid_groups),
            params.ranker.negatives_per_group,
            rng,
        ))
        valid.append(with_positive_groups(rows.features, labels, rows.group_sizes, valid_groups))
    return stack(train), stack(valid)


def evaluate_two_stage(
    events: pd.DataFrame,
    catalog: pd.DataFrame | None,
    holdout: Holdout,
    params: TrainParams,
    meta_columns: tuple[str, ...],
    say: Callable[[str], None],
    social: pd.DataFrame | None = None,
) -> TwoStageResult:
    """Train the ranker on window A, report every model on window B, refit the ranker on B."""
    assert holdout.cut is not None
    t2 = holdout.cut
    t1 = validation_cut(holdout, params.split)
    rng = np.random.default_rng(params.ranker.seed)
    n, ks = max(params.evaluation.k), params.evaluation.k

    window_a = fit_window(events, catalog, params, t1, meta_columns, social)
    label_windows = [(window_a, t1, t2)]
    for back in range(1, params.ranker.label_windows):  # earlier windows, each as of its own cut-off
        cut = t1 - back * (t2 - t1)
        if cut <= events["ts"].min():
            break
        label_windows.append((fit_window(events, catalog, params, cut, meta_columns, social), cut, cut + (t2 - t1)))
    stacked = [_ranker_data(w, events, start, end, params) for w, start, end in label_windows]
    train_data, valid_data = training_groups(stacked, params, rng)
    if not len(train_data.group_sizes):
        raise ValueError(
            f"no user bought or carted anything among their candidates in [{t1}, {t2}): "
            "the ranker has nothing to learn from"
        )
    ranker_a = fit_ranker(train_data, params.ranker, valid_data)
    say(
        f"ranker on window A ({len(stacked)} label window(s)): {len(train_data.group_sizes):,} training groups, "
        f"{len(valid_data.group_sizes):,} validation groups, {ranker_a.rounds} rounds"
    )
    targets_a = holdout_targets(
        events.loc[(events["ts"] >= t1) & (events["ts"] < t2)], window_a.users, window_a.items, params.weights
    )
    popularity_window = _best_popularity_window(window_a, targets_a, n, ks)
    propensity = fit_propensity(window_a, events, t1, t2, params.propensity, say)

    window_b = fit_window(events, catalog, params, t2, meta_columns, social)
    test = holdout.test
    targets = holdout_targets(test, window_b.users, window_b.items, params.weights)
    # The window's vocabulary holds every catalog item; "unseen" means no event before the cut-off.
    unseen = [window_b.state.item_window_counts[t, -1] == 0 for t in targets.items]
    unseen_pairs = sum(int(u.sum()) for u in unseen) + int((targets.n_targets - [len(t) for t in targets.items]).sum())
    targets = replace(targets, unseen_item_share=unseen_pairs / max(int(targets.n_targets.sum()), 1))
    rows = candidate_rows(window_b, [str(u) for u in targets.user_ids], params, UNION_SIZE)
    if not _social_on(params):
        blank_social(rows)
    started = time.perf_counter()
    scores = ranker_a.predict(rows.features)
    rank_seconds = time.perf_counter() - started
    report = EvalReport(
        k=ks,
        users=len(targets.user_ids),
        target_kind=targets.target_kind,
        unseen_item_share=targets.unseen_item_share,
        cold_user_share=targets.cold_user_share,
    )

    lists: dict[str, list[np.ndarray]] = {}
    popular = [_ranked(_popularity_scores(window_b, popularity_window), n + 2000)]
    lists[f"popular_{popularity_window}"] = compose_all(window_b, targets, n, _shared(popular))
    if popularity_window != "all":  # all-time popularity too: the plain baseline every recommender must beat
        all_time = [_ranked(_popularity_scores(window_b, "all"), n + 2000)]
        lists["popular_all"] = compose_all(window_b, targets, n, _shared(all_time))
    for name in BASELINE_SOURCES:
        lists[name] = compose_all(window_b, targets, n, per_user_lists(Source(name), rows.per_source[name]))
    union = ranked_rows(rows, rows.fused.astype(np.float64))
    lists["union_rrf"] = compose_all(window_b, targets, n, per_user_lists(Source.ALS, union))
    ranked = ranked_rows(rows, scores)
    # Serving ranks for users the model knows; the others get the fallback chain, so evaluation does too.
    lists["ranker"] = compose_all(window_b, targets, n, per_user_lists(Source.ALS, ranked, targets.user_idx >= 0))
    rankers_a = {"ranker": ranker_a}
    groups_a = {"ranker": stacked}
    if params.evaluation.social_ablation:
        lists["als_social"] = compose_all(window_b, targets, n, per_user_lists(
            Source.ALS, _social_als(window_b, targets, n, params.evaluation.social_smoothing)))
        plain = without_social(params)
        stacked_plain = [_ranker_data(w, events, start, end, plain) for w, start, end in label_windows]
        train_plain, valid_plain = training_groups(stacked_plain, plain, np.random.default_rng(params.ranker.seed))
        ranker_plain = fit_ranker(train_plain, plain.ranker, valid_plain)
        rows_plain = candidate_rows(window_b, [str(u) for u in targets.user_ids], plain, UNION_SIZE)
        blank_social(rows_plain)
        ranked_plain = ranked_rows(rows_plain, ranker_plain.predict(rows_plain.features))
        lists["ranker_no_social"] = compose_all(
            window_b, targets, n, per_user_lists(Source.ALS, ranked_plain, targets.user_idx >= 0))
        say(f"ranker without social sources and features: {ranker_plain.rounds} rounds")
        rankers_a["ranker_no_social"] = ranker_plain
        groups_a["ranker_no_social"] = stacked_plain

    via_share = attribute(events.loc[events["ts"] >= t2 - pd.Timedelta(days=7)]).purchases
    via_share = via_share.loc[via_share["ts"] >= t2]
    bought_via_share = {
        (str(u), int(i))
        for u, i in zip(via_share["user_id"], window_b.items.indexes(via_share["item_id"]), strict=True)
        if i >= 0 and u in set(targets.user_ids.tolist())
    }
    for name, model_lists in lists.items():
        report.rows[name] = score_lists(model_lists, targets, ks, len(window_b.items))
        if bought_via_share:
            report.rows[name] |= _share_metrics(model_lists, targets, bought_via_share, max(ks))
        report.curves[name] = metric_curves(model_lists, targets, len(window_b.items))
    ceiling = [
        np.isin(t, rows.items[s]).sum() / max(nt, 1)
        for t, nt, s in zip(targets.items, targets.n_targets, rows.group_slices(), strict=True)
    ]
    report.rows["ranker"]["candidate_recall_at_union"] = float(np.mean(ceiling)) if ceiling else 0.0
    report.rows["ranker"]["latency_ms_per_user"] = 1000.0 * (rows.seconds + rank_seconds) / max(len(ranked), 1)

    k = max(ks)
    baselines = [name for name in lists if not name.startswith("ranker") and name != "union_rrf"]
    best = max(baselines, key=lambda name: report.rows[name][f"ndcg_at_{k}"])
    ours = per_user_metrics(lists["ranker"], targets, k)
    theirs = per_user_metrics(lists[best], targets, k)
    low, mid, high = bootstrap_ratio(ours, theirs, rng)
    report.comparison = {"best_baseline": best, "ratio": mid, "ci_low": low, "ci_high": high, "k": k}
    if "ranker_no_social" in lists:
        low, mid, high = bootstrap_ratio(ours, per_user_metrics(lists["ranker_no_social"], targets, k), rng)
        report.ablation = {"against": "ranker_no_social", "ratio": mid, "ci_low": low, "ci_high": high, "k": k}
    returning = targets.user_idx >= 0
    for label, mask in (("returning", returning), ("new", ~returning)):
        if mask.any():
            report.breakdown[label] = {
                name: float(per_user_metrics(model_lists, targets, k)[mask].mean())
                for name, model_lists in lists.items()
            } | {"users": float(mask.sum())}

    labels_b = attach_labels(rows, window_b, labels_between(events, t2, None))
    final_data = stack([
        sample_negatives(with_positive_groups(r.features, lab, r.group_sizes), params.ranker.negatives_per_group, rng)
        for r, lab in [(rows, labels_b), *stacked]
    ])
    ranker = fit_ranker(final_data, params.ranker, rounds=ranker_a.rounds) if len(final_data.group_sizes) else ranker_a
    windows = {
        "T0": events["ts"].min().isoformat(),
        "T1": t1.isoformat(),
        "T2": t2.isoformat(),
        "T3": events["ts"].max().isoformat(),
    }
    return TwoStageResult(report, ranker, windows, popularity_window, propensity, window_b, rankers_a,
                          label_windows, groups_a, final_data)
