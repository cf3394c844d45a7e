"""Propensity feature sets on the validation window only: which columns make the category model beat the
baseline at the top 1%?

Same procedure as `propensity_variants.py` (the test part dropped; the category model fitted with features as
of T0 and labels in [T0, T1), measured over every user of the window as of T1 on [T1, T2)), with the served
logistic regression throughout and the feature set varied:

- `v1`: the columns of PROPENSITY_VERSION 1 (no reorder timing, intent or friends);
- `+due`: the reorder timing bins (user_target_due_*, the target's interval);
- `+own_due`: the same bins by the user's own interval, for pairs bought on two occasions or more;
- `+touch_3d`: the recency of the last touch of the target at a 3-day half-life (recent intent);
- `+friends_7d`: log(1 + people the user sees who bought the target in the last 7 days);
- `+repeat_x`: the history and ALS columns again, multiplied by the target's repeat share (so consumables
  and durables can weigh them differently);
- `served`: features.propensity.FEATURE_NAMES (v1 + due + touch_3d + friends_7d).

    OMP_NUM_THREADS=1 nice -n 10 uv run python benchmarks/propensity_features.py demo20k=/tmp/pr/demo20k \\
        demo20k_s11=/tmp/pr/demo20k_s11 demo=/tmp/pr/demo5k epinions=../shared/data/epinions \\
        amazon=../shared/data/amazon:benchmarks/params/amazon-tuned.yaml --out /tmp/pr/pf.csv   # ~8 min, busy
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from propensity_variants import fit_lr, holdout_lifts, run, summary, validation_window

from features.propensity import DUE_BINS, DUE_EDGES, FEATURE_NAMES, PropensityContext
from features.state import DAY

NEW = ("user_target_due_", "user_target_touch_recency_3d", "user_target_friends_bought_")
V1 = [i for i, f in enumerate(FEATURE_NAMES) if not f.startswith(NEW)]
DUE = [i for i, f in enumerate(FEATURE_NAMES) if f.startswith("user_target_due_")]
TOUCH = FEATURE_NAMES.index("user_target_touch_recency_3d")
FRIENDS = FEATURE_NAMES.index("user_target_friends_bought_7d")
# history and ALS columns that `repeat_x` also gives multiplied by the target's repeat share
INTERACTED = [i for i in V1 if FEATURE_NAMES[i].startswith(("user_target_purchase", "user_target_items",
                                                            "user_target_touch", "user_target_als"))]
N = len(FEATURE_NAMES)
OWN = list(range(N, N + len(DUE_BINS)))
REPEAT = list(range(N + len(DUE_BINS), N + len(DUE_BINS) + len(INTERACTED)))
FEATURE_SETS: dict[str, list[int]] = {  # columns of the served features followed by extra_columns'
    "v1": V1,
    "v1+repeat_x": [*V1, *REPEAT],
    "v1+due": [*V1, *DUE],
    "v1+due+own_due": [*V1, *DUE, *OWN],
    "v1+due+touch_3d": [*V1, *DUE, TOUCH],
    "v1+due+friends_7d": [*V1, *DUE, FRIENDS],
    "v1+due+repeat_x": [*V1, *DUE, *REPEAT],
    "served": list(range(N)),
    "served+own_due": [*range(N), *OWN],
}


def extra_columns(context: PropensityContext, items: np.ndarray, rows: np.ndarray, served: np.ndarray) -> np.ndarray:
    """The experimental columns: the due bins by the user's own interval, and the history and ALS columns x
    the target's repeat share."""
    state, n = context.state, context.n_users
    repeat_share = context.item_repeat_pairs[items].sum() / max(context.item_buyer_pairs[items].sum(), 1.0)
    baskets = state.pair_baskets.tocsc()[:, items].tocoo()
    first = state.pair_first_purchase.tocsc()[:, items].tocoo()
    last = state.pair_last_purchase.tocsc()[:, items].tocoo()
    again = baskets.data >= 2
    own = np.maximum((last.data - first.data) / DAY / np.maximum(baskets.data - 1, 1), 0.5)
    ratio = (context.reference - last.data) / DAY / own
    due_bin = np.searchsorted(np.asarray(DUE_EDGES), ratio, side="right")
    own_due = np.zeros((len(DUE_BINS), n))
    np.add.at(own_due, (due_bin[again], baskets.row[again]), 1.0)
    return np.column_stack([own_due[:, rows].T, repeat_share * served[:, INTERACTED]])


def rows_of(context: PropensityContext, targets: list[np.ndarray], labels: sp.csc_matrix, max_rows: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """training.propensity.training_rows with the extra columns appended."""
    n = context.n_users
    positive = [np.asarray(labels[:, items].getnnz(axis=1)).ravel() > 0 for items in targets]
    n_pos = int(sum(p.sum() for p in positive))
    rate = min(1.0, max(max_rows - n_pos, 1) / max(len(targets) * n - n_pos, 1))
    features, y = [], []
    for items, is_pos in zip(targets, positive, strict=True):
        rows = np.flatnonzero(is_pos | ((rng.random(n) < rate) & ~is_pos))
        served = context.features(context.target(items), rows)
        features.append(np.hstack([served, extra_columns(context, items, rows, served)]))
        y.append(is_pos[rows])
    return np.concatenate(features), np.concatenate(y)


def evaluate(name: str, data_dir: Path, params_file: Path | None) -> pd.DataFrame:
    setup = validation_window(name, data_dir, params_file)
    x, y = rows_of(setup.context, setup.targets, setup.labels, setup.params.propensity.max_rows,
                   np.random.default_rng(setup.params.propensity.seed))
    print(f"{name}: {len(y):,} rows ({int(y.sum()):,} positives)", flush=True)
    scorers = {variant: fit_lr(x[:, cols], y) for variant, cols in FEATURE_SETS.items()}

    def score(context: PropensityContext, items: np.ndarray) -> dict[str, np.ndarray]:
        everyone = np.arange(context.n_users)
        served = context.features(context.target(items), everyone)
        features = np.hstack([served, extra_columns(context, items, everyone, served)])
        return {variant: scorer(features[:, FEATURE_SETS[variant]]) for variant, scorer in scorers.items()}

    return holdout_lifts(name, setup, score)


def main() -> None:
    run(__doc__, evaluate, Path("propensity_features.csv"), lambda table: summary(table, FEATURE_SETS, "feature set"))


if __name__ == "__main__":
    main()
