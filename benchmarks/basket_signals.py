"""Basket signals for repeat-heavy data: do they lift the ranker over the `repeat` baseline?

Extra columns are appended to the ranker's FEATURE_NAMES, each computed from the purchase occasions (days
with a purchase, as `features.state` counts them) strictly before the window's cut-off, and a LambdaRank
with the served settings (`training.ranker.fit_ranker`) is trained per variant:

- `tifu`: the user's vector of time-decayed, per-occasion item frequency (weight DECAY ** occasions ago,
  divided by the sum of the weights), the mean vector of the user's NEIGHBOURS nearest users (cosine on those
  vectors), the blend ALPHA * own + (1 - ALPHA) * neighbours, and each one's rank within the user's row;
- `reorder`: consecutive occasions with the item up to its last, mean position in the basket (0 first,
  1 last, from purchase times), the item's mean gap between repurchases over all users, days since the
  pair's last purchase over that gap, the item's mean share of occasions among its buyers;
- `window_rates`: of the h-day windows (h = 7, 14, 30) starting between the user's first purchase day and
  the cut-off, the share holding a purchase of the item (the label asks "bought within the next days");
- `all`: the three together; `base`: the served columns alone.

Each variant is measured on validation (ranker trained on three label windows before T1, scored on [T1, T2):
the one to decide on) and on the test (trained on [T1, T2) and the two windows before, scored on [T2, T3) as
`sharefeed evaluate` with `ranker.label_windows: 3` does), NDCG@20 over the `repeat` baseline of the same
users, mean over `--seeds` ranker seeds. It also prints the hits per user among ten items the user never
bought, as proposed by the neighbours' vectors and by ALS (could the neighbours be a candidate source?).

    OMP_NUM_THREADS=1 nice -n 10 uv run python benchmarks/basket_signals.py --data ../shared/data/instacart \\
        --params benchmarks/params/instacart-tuned.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from features.dataset import Dataset, load_dataset
from features.feed import Candidates, Source, compose_feed
from features.ranking import FEATURE_NAMES
from features.state import DAY, cell_values
from features.weights import CONVERSION_TYPES
from training.bundle import ITEM_META_COLUMNS
from training.evaluate import Targets, holdout_targets, per_user_metrics
from training.params import TrainParams, load_params
from training.ranker import fit_ranker, sample_negatives, with_positive_groups
from training.split import time_holdout, validation_cut
from training.twostage import stack
from training.window import CandidateRows, Window, attach_labels, candidate_rows, fit_window, labels_between

DECAY = 0.9
NEIGHBOURS = 30
ALPHA = 0.9
WINDOW_DAYS = (7, 14, 30)
UNION_SIZE = 250  # as training.twostage
N = 20
TIFU = ("tifu_own", "tifu_neighbours", "tifu_blend", "tifu_own_rank", "tifu_neighbours_rank", "tifu_blend_rank")
REORDER = ("pair_streak", "pair_basket_position", "item_reorder_gap_days", "pair_gap_due_ratio",
           "item_buyer_basket_share")
WINDOW_RATES = tuple(f"pair_bought_within_{h}d_rate" for h in WINDOW_DAYS)
VARIANTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "tifu": TIFU,
    "reorder": REORDER,
    "window_rates": WINDOW_RATES,
    "all": (*TIFU, *REORDER, *WINDOW_RATES),
}


@dataclass(slots=True)
class Part:
    """One window's candidate rows for the users who bought in its label window, with the extra columns."""

    window: Window
    rows: CandidateRows
    labels: np.ndarray
    targets: Targets
    extra: dict[str, np.ndarray]


def occasion_lines(events: pd.DataFrame, window: Window) -> pd.DataFrame:
    """One row per (user, item, occasion) before the cut-off: day, occasion ordinal, position in the basket."""
    bought = events.loc[(events["ts"] < window.cutoff) & events["event_type"].isin(CONVERSION_TYPES)]
    user = window.users.indexes(bought["user_id"])
    item = window.items.indexes(bought["item_id"])
    seconds = bought["ts"].astype("int64").to_numpy() / 1e9
    lines = pd.DataFrame({"u": user, "i": item, "s": seconds, "d": np.floor(seconds / DAY).astype(np.int64)})
    lines = lines.loc[(lines["u"] >= 0) & (lines["i"] >= 0)]
    basket = lines.groupby(["u", "d"])
    size = basket["i"].transform("size")
    lines["position"] = (basket["s"].rank(method="first") - 1) / np.maximum(size - 1, 1)
    lines = lines.groupby(["u", "i", "d"], as_index=False).agg(s=("s", "min"), position=("position", "min"))
    lines["o"] = lines.groupby("u")["d"].rank(method="dense").astype(np.int64)
    return lines.sort_values(["u", "i", "o"], kind="stable").reset_index(drop=True)


def _matrix(lines: pd.DataFrame, values: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    matrix = sp.csr_matrix((values.astype(np.float64), (lines["u"].to_numpy(), lines["i"].to_numpy())), shape=shape)
    matrix.sum_duplicates()
    return matrix


def _row_ranks(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """1-based rank of every stored value within its row, highest first."""
    ranks = matrix.copy()
    for row in range(matrix.shape[0]):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        order = np.argsort(-matrix.data[start:end], kind="stable")
        ranks.data[start + order] = np.arange(1, end - start + 1)
    return ranks


def _tifu(lines: pd.DataFrame, baskets: np.ndarray, shape: tuple[int, int]) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The users' own decayed occasion vectors and the mean vectors of their nearest users."""
    ago = baskets[lines["u"].to_numpy()] - lines["o"].to_numpy()
    own = _matrix(lines, np.power(DECAY, ago), shape)
    total = (1.0 - np.power(DECAY, baskets)) / (1.0 - DECAY)
    own = sp.csr_matrix(sp.diags(np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)) @ own)
    norms = np.sqrt(np.asarray(own.multiply(own).sum(axis=1)).ravel())
    unit = sp.csr_matrix(sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)) @ own)
    n_users = shape[0]
    k = min(NEIGHBOURS, n_users - 1)
    similarity = (unit @ unit.T).toarray()  # a benchmark on a few thousand users: dense is fine
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    mean = sp.csr_matrix((np.full(n_users * k, 1.0 / k), (np.repeat(np.arange(n_users), k), nearest.ravel())),
                         shape=(n_users, n_users))
    return own, sp.csr_matrix(mean @ own)


def _window_rates(lines: pd.DataFrame, cut_day: int, shape: tuple[int, int]) -> dict[int, sp.csr_matrix]:
    """Per pair and h: the share of h-day windows starting in [user's first day, cut day - h] with a purchase."""
    day = lines["d"].to_numpy()
    first = lines.groupby("u")["d"].transform("min").to_numpy()
    previous = lines.groupby(["u", "i"])["d"].shift().to_numpy()
    out = {}
    for h in WINDOW_DAYS:
        last_start = cut_day - h
        start = np.maximum(day - h + 1, first)  # the starts whose window holds this day ...
        start = np.where(np.isnan(previous), start, np.maximum(start, np.minimum(previous, last_start) + 1))
        covered = np.clip(np.minimum(day, last_start) - start + 1, 0, None)  # ... not already counted
        starts = last_start - first + 1
        share = np.divide(covered, starts, out=np.zeros(len(day)), where=starts > 0)
        out[h] = _matrix(lines, share, shape)
        out[h].data += 1e-6  # a pair never bought inside a full window still differs from no pair
    return out


def extra_columns(events: pd.DataFrame, window: Window, rows: CandidateRows) -> dict[str, np.ndarray]:
    """Every extra column for the window's candidate rows, from purchases before its cut-off."""
    shape = (len(window.users), len(window.items))
    lines = occasion_lines(events, window)
    users = lines["u"].to_numpy()
    baskets = np.zeros(shape[0])
    np.maximum.at(baskets, users, lines["o"].to_numpy().astype(np.float64))
    own, neighbours = _tifu(lines, baskets, shape)
    blend = sp.csr_matrix(ALPHA * own + (1.0 - ALPHA) * neighbours)

    run_start = (lines["o"].diff() != 1) | (lines["u"].diff() != 0) | (lines["i"].diff() != 0)
    lines["streak"] = lines.groupby(run_start.cumsum()).cumcount() + 1
    last = lines.groupby(["u", "i"]).tail(1)
    position = lines.groupby(["u", "i"], as_index=False)["position"].mean()
    gaps = lines.groupby(["u", "i"])["s"].diff() / DAY
    item_gap = np.full(shape[1], np.nan)
    by_item = gaps.groupby(lines["i"]).mean().dropna()
    item_gap[by_item.index.to_numpy()] = by_item.to_numpy()
    pairs = lines.groupby(["u", "i"], as_index=False).size()
    pairs["share"] = pairs["size"] / baskets[pairs["u"].to_numpy()]
    item_share = np.full(shape[1], np.nan)
    by_item = pairs.groupby("i")["share"].mean()
    item_share[by_item.index.to_numpy()] = by_item.to_numpy()
    rates = _window_rates(lines, int(np.floor(window.cutoff.value / 1e9 / DAY)), shape)

    user = np.repeat(rows.user_idx, rows.group_sizes)
    item = rows.items
    last_bought = cell_values(window.state.pair_last_purchase, user, item)
    since = np.where(last_bought > 0, (window.state.cutoff_seconds - last_bought) / DAY, np.nan)

    def cells(matrix: sp.csr_matrix, missing_as_nan: bool = False) -> np.ndarray:
        values = cell_values(matrix, user, item)
        return np.where(values > 0, values, np.nan) if missing_as_nan else values

    columns = {
        "tifu_own": cells(own),
        "tifu_neighbours": cells(neighbours),
        "tifu_blend": cells(blend),
        "tifu_own_rank": cells(_row_ranks(own), True),
        "tifu_neighbours_rank": cells(_row_ranks(neighbours), True),
        "tifu_blend_rank": cells(_row_ranks(blend), True),
        "pair_streak": cells(_matrix(last, last["streak"].to_numpy(), shape), True),
        "pair_basket_position": cells(_matrix(position, position["position"].to_numpy() + 1.0, shape), True) - 1.0,
        "item_reorder_gap_days": item_gap[item],
        "pair_gap_due_ratio": since / item_gap[item],
        "item_buyer_basket_share": item_share[item],
    }
    columns |= {f"pair_bought_within_{h}d_rate": cells(rates[h]) for h in WINDOW_DAYS}
    return columns


def unbought_hits(part: Part, events: pd.DataFrame, per_user: int = 10) -> dict[str, float]:
    """Targets hit per user among `per_user` items the user never bought: neighbours' vectors against ALS."""
    shape = (len(part.window.users), len(part.window.items))
    lines = occasion_lines(events, part.window)
    baskets = np.zeros(shape[0])
    np.maximum.at(baskets, lines["u"].to_numpy(), lines["o"].to_numpy().astype(np.float64))
    own, neighbours = _tifu(lines, baskets, shape)
    hits: dict[str, list[int]] = {"neighbours": [], "als": []}
    for position, user in enumerate(part.targets.user_idx.tolist()):
        targets = part.targets.items[position]
        history = own.indices[own.indptr[user] : own.indptr[user + 1]] if user >= 0 else np.empty(0, np.int64)
        if user >= 0:
            start, end = neighbours.indptr[user], neighbours.indptr[user + 1]
            cols, values = neighbours.indices[start:end], neighbours.data[start:end]
            fresh = ~np.isin(cols, history)
            cols, values = cols[fresh], values[fresh]
            proposed = cols[np.lexsort((cols, -values))[:per_user]]
        else:
            proposed = np.empty(0, np.int64)
        hits["neighbours"].append(int(np.isin(proposed, targets).sum()))
        als = part.rows.per_source["als"][position]
        hits["als"].append(int(np.isin(als[~np.isin(als, history)][:per_user], targets).sum()))
    return {name: float(np.mean(values)) for name, values in hits.items()}


def build_part(events: pd.DataFrame, catalog: pd.DataFrame | None, social: pd.DataFrame | None,
               params: TrainParams, cutoff: pd.Timestamp, end: pd.Timestamp | None) -> Part:
    window = fit_window(events, catalog, params, cutoff, ITEM_META_COLUMNS, social)
    after = events["ts"] >= cutoff
    labelled = events.loc[after & (events["ts"] < end)] if end is not None else events.loc[after]
    targets = holdout_targets(labelled, window.users, window.items, params.weights)
    rows = candidate_rows(window, [str(u) for u in targets.user_ids], params, UNION_SIZE)
    labels = attach_labels(rows, window, labels_between(events, cutoff, end))
    return Part(window, rows, labels, targets, extra_columns(events, window, rows))


def label_window_parts(data: Dataset, params: TrainParams, windows: int) -> list[Part]:
    """Parts as of T2 (the test), T1 (validation) and `windows` earlier cut-offs one validation span apart
    (those after the first event), each labelled up to the next cut-off; says the cut-offs and group counts."""
    events = data.events
    holdout = time_holdout(events, params.split)
    assert holdout.cut is not None
    t2 = holdout.cut
    t1 = validation_cut(holdout, params.split)
    span = t2 - t1
    cuts = [c for c in [t2, t1, *(t1 - back * span for back in range(1, windows + 1))] if c > events["ts"].min()]
    parts = [build_part(events, data.items, data.social, params, cut, cut + span if cut < t2 else None)
             for cut in cuts]
    print(f"windows as of {', '.join(c.date().isoformat() for c in cuts)}; "
          f"label groups {', '.join(str(len(p.rows.user_ids)) for p in parts)}", flush=True)
    return parts


def part_features(part: Part, names: tuple[str, ...]) -> np.ndarray:
    return np.column_stack([part.rows.features, *(part.extra[name] for name in names)]).astype(np.float32)


def part_feeds(part: Part, ranked: list[np.ndarray]) -> list[np.ndarray]:
    """Each user's list then the trending fallback, blocked items removed (as the evaluation composes them)."""
    state = part.window.state
    score = state.item_trending + 1e-6 * state.item_buyers
    order = np.lexsort((np.arange(len(score)), -score))
    fallback = Candidates(Source.POPULAR, order[score[order] > 0][: N + 2000].astype(np.int64),
                          np.zeros(min(int((score > 0).sum()), N + 2000), np.float32))
    blocked = part.window.blocked
    mask = np.zeros(len(part.window.items), dtype=bool)
    out = []
    for items, user in zip(ranked, part.targets.user_idx.tolist(), strict=True):
        cut = blocked.indices[blocked.indptr[user] : blocked.indptr[user + 1]] if user >= 0 else np.empty(0, int)
        mask[cut] = True
        chain = [Candidates(Source.ALS, items, np.zeros(len(items), np.float32)), fallback] if user >= 0 else [fallback]
        out.append(compose_feed(chain, N, mask).items)
        mask[cut] = False
    return out


def ranker_ratio(train: list[Part], test: Part, names: tuple[str, ...], params: TrainParams, seed: int,
                 settings: Mapping[str, object] | None = None) -> float:
    """The variant's ranker NDCG@20 over the repeat baseline's on `test`, trained on `train`.

    `settings`: LightGBM settings over the ranker's own (`fit_ranker`)."""
    rng = np.random.default_rng(seed)
    users = sorted({u for part in train for u in part.rows.user_ids})
    held = dict(zip(users, (rng.random(len(users)) < params.ranker.validation_share).tolist(), strict=True))
    fitting, stopping = [], []
    for part in train:
        features = part_features(part, names)
        valid = np.asarray([held[u] for u in part.rows.user_ids], dtype=bool)
        fitting.append(sample_negatives(with_positive_groups(features, part.labels, part.rows.group_sizes, ~valid),
                                        params.ranker.negatives_per_group, rng))
        stopping.append(with_positive_groups(features, part.labels, part.rows.group_sizes, valid))
    ranker_params = params.ranker.model_copy(update={"seed": seed})
    ranker = fit_ranker(stack(fitting), ranker_params, stack(stopping), feature_names=(*FEATURE_NAMES, *names),
                        settings=settings)
    scores = ranker.predict(part_features(test, names))
    ranked = [test.rows.items[s][np.argsort(-scores[s], kind="stable")] for s in test.rows.group_slices()]
    ours = per_user_metrics(part_feeds(test, ranked), test.targets, N)
    repeat = per_user_metrics(part_feeds(test, test.rows.per_source["repeat"]), test.targets, N)
    return float(ours.mean() / repeat.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    params = load_params(args.params)
    data = load_dataset(args.data, params.weights.keys())
    with threadpool_limits(1, "blas"):
        parts = label_window_parts(data, params, 3)
        print("test hits per user among 10 never-bought items:",
              {k: round(v, 3) for k, v in unbought_hits(parts[0], data.events).items()})
        seeds = [params.ranker.seed + s for s in range(args.seeds)]
        for name, columns in VARIANTS.items():
            validation = [ranker_ratio(parts[2:5], parts[1], columns, params, s) for s in seeds]
            test = [ranker_ratio(parts[1:4], parts[0], columns, params, s) for s in seeds]
            print(f"{name:>13}: ranker / repeat NDCG@{N} validation {np.mean(validation):.4f} "
                  f"(seeds {' '.join(f'{v:.4f}' for v in validation)}), test {np.mean(test):.4f} "
                  f"(seeds {' '.join(f'{v:.4f}' for v in test)})", flush=True)


if __name__ == "__main__":
    main()
