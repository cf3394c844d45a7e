"""How far can the ranker's columns go on the test window itself? Cross-fitting over the test users.

The served evaluation trains the ranker on label windows before T2 and scores it on [T2, T3). If the ranker
falls short because those windows ask another question than the test (other lengths, other users, a
different season), a ranker trained on the test window's own labels would do much better. This script
measures that: the test users are split into `--folds` folds; for each fold a ranker is trained on the other
folds' groups of the test window (features as of T2, labels from [T2, T3)), optionally with the earlier
label windows too, and scores the held-out fold. Every user is scored by a ranker that never saw them, so the
figure is an honest estimate of what these columns can reach when the learning task is the test's own.

It is a diagnostic, not a model: a storefront cannot learn from labels it has not seen yet. Setups:

- `windows`: the served way (three label windows before T2), for reference;
- `test_folds`: the other folds of the test window only;
- `windows_and_test_folds`: both;

each with the served columns (`base`), with every column of `benchmarks/basket_signals.py` (`all`), and with
the raw recent basket sequence on top (`presence`: for each of the user's last PRESENCE_OCCASIONS purchase
occasions, was the item in it; `all_presence`: both), from which the hand-made timing columns derive.
NDCG@20 over the `repeat` baseline of the same users, with a bootstrap 95% interval (users resampled), mean
and spread over `--seeds` (each seed draws its own folds, held-out stopping users and sampled negatives).

    OMP_NUM_THREADS=1 uv run python benchmarks/crossfit_test_window.py --data ../shared/data/instacart \\
        --params benchmarks/params/instacart-tuned.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from basket_signals import VARIANTS, N, Part, label_window_parts, occasion_lines, part_features, part_feeds
from threadpoolctl import threadpool_limits

from features.dataset import load_dataset
from features.ranking import FEATURE_NAMES
from features.state import cell_values
from training.evaluate import bootstrap_ratio, per_user_metrics
from training.params import TrainParams, load_params
from training.ranker import RankerData, fit_ranker, sample_negatives, with_positive_groups
from training.twostage import stack

SETUPS = ("windows", "test_folds", "windows_and_test_folds")
PRESENCE_OCCASIONS = 10
PRESENCE = tuple(f"pair_in_occasion_{k}_ago" for k in range(PRESENCE_OCCASIONS))
COLUMNS: dict[str, tuple[str, ...]] = {**VARIANTS, "presence": PRESENCE, "all_presence": (*VARIANTS["all"], *PRESENCE)}


def add_presence(part: Part, events: pd.DataFrame) -> None:
    """Per candidate row, 0/1 for each of the user's last PRESENCE_OCCASIONS occasions before the cut-off."""
    lines = occasion_lines(events, part.window)
    shape = (len(part.window.users), len(part.window.items))
    last = lines.groupby("u")["o"].transform("max").to_numpy()
    ago = last - lines["o"].to_numpy()
    user = np.repeat(part.rows.user_idx, part.rows.group_sizes)
    for k, name in enumerate(PRESENCE):
        mine = ago == k
        matrix = sp.csr_matrix((np.ones(int(mine.sum())), (lines["u"].to_numpy()[mine], lines["i"].to_numpy()[mine])),
                               shape=shape)
        part.extra[name] = cell_values(matrix, user, part.rows.items)


def _training_sets(parts: list[tuple[Part, np.ndarray]], names: tuple[str, ...], params: TrainParams,
                   rng: np.random.Generator) -> tuple[RankerData, RankerData]:
    """Fitting and early-stopping groups from each part's chosen groups, users held out per the params."""
    users = sorted({u for part, keep in parts for u, k in zip(part.rows.user_ids, keep, strict=True) if k})
    held = dict(zip(users, (rng.random(len(users)) < params.ranker.validation_share).tolist(), strict=True))
    fitting, stopping = [], []
    for part, keep in parts:
        features = part_features(part, names)
        valid = np.asarray([held.get(u, False) for u in part.rows.user_ids], dtype=bool)
        fitting.append(sample_negatives(with_positive_groups(features, part.labels, part.rows.group_sizes,
                                                             keep & ~valid),
                                        params.ranker.negatives_per_group, rng))
        stopping.append(with_positive_groups(features, part.labels, part.rows.group_sizes, keep & valid))
    return stack(fitting), stack(stopping)


def cross_fitted_scores(windows: list[Part], test: Part, setup: str, names: tuple[str, ...], params: TrainParams,
                        folds: int, seed: int) -> np.ndarray:
    """A score for every candidate row of `test`, each group scored by a ranker trained without its user."""
    rng = np.random.default_rng(seed)
    n_groups = len(test.rows.user_ids)
    cross_fitted = setup != "windows"
    folds = folds if cross_fitted else 1
    fold_of = rng.permutation(n_groups) % folds if cross_fitted else np.zeros(n_groups, dtype=np.int64)
    every_group = [(part, np.ones(len(part.rows.user_ids), dtype=bool)) for part in windows]
    earlier = [] if setup == "test_folds" else every_group
    ranker_params = params.ranker.model_copy(update={"seed": seed})
    features = part_features(test, names)
    scores = np.zeros(len(test.rows.items), dtype=np.float64)
    rows_fold = np.repeat(fold_of, test.rows.group_sizes)
    for fold in range(folds):
        others = [(test, fold_of != fold)] if cross_fitted else []
        fitting, stopping = _training_sets([*earlier, *others], names, params, rng)
        ranker = fit_ranker(fitting, ranker_params, stopping, feature_names=(*FEATURE_NAMES, *names))
        mine = rows_fold == fold
        scores[mine] = ranker.predict(features[mine])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--variants", nargs="*", default=["base", "all"], choices=list(COLUMNS))
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    args = parser.parse_args()
    params = load_params(args.params)
    data = load_dataset(args.data, params.weights.keys())
    with threadpool_limits(1, "blas"):
        parts = label_window_parts(data, params, 3)
        test, windows = parts[0], parts[1:4]
        if any("presence" in v for v in args.variants):
            for part in parts[:4]:
                add_presence(part, data.events)
        repeat = per_user_metrics(part_feeds(test, test.rows.per_source["repeat"]), test.targets, N)
        print(f"test users {len(test.rows.user_ids)}, repeat NDCG@{N} {repeat.mean():.4f}", flush=True)
        for variant in args.variants:
            names = COLUMNS[variant]
            for setup in args.setups:
                ratios, lows, highs = [], [], []
                for s in range(args.seeds):
                    seed = params.ranker.seed + s
                    scores = cross_fitted_scores(windows, test, setup, names, params, args.folds, seed)
                    ranked = [test.rows.items[g][np.argsort(-scores[g], kind="stable")]
                              for g in test.rows.group_slices()]
                    ours = per_user_metrics(part_feeds(test, ranked), test.targets, N)
                    low, ratio, high = bootstrap_ratio(ours, repeat, np.random.default_rng(seed))
                    ratios.append(ratio)
                    lows.append(low)
                    highs.append(high)
                print(f"{variant:>5} {setup:>22}: ranker / repeat NDCG@{N} {np.mean(ratios):.4f} "
                      f"(seeds {' '.join(f'{r:.4f}' for r in ratios)}; intervals "
                      f"{' '.join(f'{lo:.3f}-{hi:.3f}' for lo, hi in zip(lows, highs, strict=True))})", flush=True)


if __name__ == "__main__":
    main()
