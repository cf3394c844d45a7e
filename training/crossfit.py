"""The ranker under the random and last protocols: labels from the held-out pairs, judged by cross-fitting.

Without a time window the ranker's labels are the holdout's own pairs, so it must never be scored on the
users it learned from: the holdout's users are split in two folds, a ranker fitted on one fold's groups
ranks the other fold's users, and every user's list comes from a ranker that never saw them. Those lists
compete with the single sources in `training.selection`. The ranker a bundle serves is fitted on both
folds (the round count is the folds' mean), with candidates and features from the models fitted on the
holdout's training part; serving applies it to the same features computed from the refit on all the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.vocab import Vocabulary
from features.weights import CONVERSION_TYPES
from training.evaluate import Targets
from training.params import TrainParams
from training.ranker import Ranker, fit_ranker, sample_negatives, with_positive_groups
from training.twostage import UNION_SIZE, blank_social, ranked_rows, stack, training_groups
from training.window import CandidateRows, Window, attach_labels, candidate_rows

MAX_USERS = 6000  # held-out users whose candidates are built for the ranker (a sample when there are more)
FOLDS = 2


@dataclass(frozen=True, slots=True)
class CrossFitted:
    lists: dict[int, np.ndarray]  # user row -> items ranked by the fold ranker that did not see the user
    ranker: Ranker  # fitted on every fold, for the bundle
    users: int
    groups: int


def pair_labels(held: pd.DataFrame, targets: Targets, items: Vocabulary) -> pd.DataFrame:
    """Gain 2 for a relevant pair the user bought, 1 for any other relevant pair."""
    wanted = {(str(u), items.id_of(int(i))) for u, idx in zip(targets.user_ids, targets.items, strict=True)
              for i in idx}
    frame = held[["user_id", "item_id", "event_type"]]
    keys = list(zip(frame["user_id"].astype(str), frame["item_id"].astype(str), strict=True))
    keep = np.fromiter((k in wanted for k in keys), dtype=bool, count=len(keys))
    frame = frame.loc[keep]
    frame = frame.assign(label=np.where(frame["event_type"].isin(CONVERSION_TYPES), 2, 1).astype(np.int32))
    return frame.groupby(["user_id", "item_id"], sort=False)["label"].max().reset_index()


def _subset(rows: CandidateRows, keep: np.ndarray) -> CandidateRows:
    """The groups of `rows` whose users are kept (a boolean per group)."""
    per_row = np.repeat(keep, rows.group_sizes)
    return CandidateRows(
        [u for u, k in zip(rows.user_ids, keep.tolist(), strict=True) if k], rows.user_idx[keep],
        rows.group_sizes[keep], rows.items[per_row], rows.features[per_row], rows.first_source[per_row],
        rows.fused[per_row])


def cross_fit(window: Window, held: pd.DataFrame, targets: Targets, params: TrainParams,
              say: Callable[[str], None]) -> CrossFitted | None:
    """Rank each held-out user (at most MAX_USERS of them) with a ranker fitted on the other fold."""
    rng = np.random.default_rng(params.ranker.seed)
    known = [str(u) for u, row in zip(targets.user_ids, targets.user_idx, strict=True) if row >= 0]
    if len(known) > MAX_USERS:
        known = sorted(rng.choice(known, MAX_USERS, replace=False).tolist())
    rows = candidate_rows(window, known, params, UNION_SIZE)
    if not params.ranker.social:
        blank_social(rows)
    labels = attach_labels(rows, window, pair_labels(held, targets, window.items))
    fold = rng.integers(0, FOLDS, size=len(rows.user_ids))
    lists: dict[int, np.ndarray] = {}
    rounds: list[int] = []
    for f in range(FOLDS):
        inside = fold != f
        fitted = _subset(rows, inside)
        train, valid = training_groups([(fitted, labels[np.repeat(inside, rows.group_sizes)])], params, rng)
        if not len(train.group_sizes) or not len(valid.group_sizes):
            return None
        ranker = fit_ranker(train, params.ranker, valid)
        rounds.append(ranker.rounds)
        scored = _subset(rows, ~inside)
        for row, items in zip(scored.user_idx.tolist(), ranked_rows(scored, ranker.predict(scored.features)),
                              strict=True):
            lists[int(row)] = items
    everyone = stack([sample_negatives(with_positive_groups(rows.features, labels, rows.group_sizes),
                                       params.ranker.negatives_per_group, rng)])
    final = fit_ranker(everyone, params.ranker, rounds=max(1, round(float(np.mean(rounds)))))
    say(f"ranker cross-fitted on {len(known):,} held-out users in {FOLDS} folds ({rounds} rounds); "
        f"served ranker: {final.rounds} rounds on {len(everyone.group_sizes):,} groups")
    return CrossFitted(lists, final, len(known), len(everyone.group_sizes))

