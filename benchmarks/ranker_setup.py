"""The ranker's learning setup on small data: objective, regularisation, negatives, label windows.

The served columns only (no extra ones); per setup, the ranker parameters of `--params` with a few changed
(`ranker.*`) and, for LightGBM settings the parameters do not hold, `settings` passed to `fit_ranker`. Each
setup is measured as `benchmarks/basket_signals.py` measures its variants: on validation (trained on the
setup's label windows before T1, scored on [T1, T2): the one to decide on) and on the test (trained on
[T1, T2) and the windows before, scored on [T2, T3), report only), NDCG@20 over the `repeat` baseline of the
same users, mean over `--seeds` ranker seeds (each seed draws its own held-out users and sampled negatives).

    OMP_NUM_THREADS=1 nice -n 10 uv run python benchmarks/ranker_setup.py --data ../shared/data/instacart \\
        --params benchmarks/params/instacart-tuned.yaml
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from basket_signals import N, label_window_parts, ranker_ratio
from threadpoolctl import threadpool_limits

from features.dataset import load_dataset
from training.params import TrainParams, load_params

ALL_NEGATIVES = 10_000  # above the candidate union (250): every candidate row of a group is a training row
SMALL_DATA: dict[str, object] = {  # fewer, smaller trees, more of them, stopped later
    "num_leaves": 7,
    "min_data_in_leaf": 20,
    "learning_rate": 0.03,
    "feature_fraction": 0.6,
    "lambda_l2": 10.0,
    "max_rounds": 1000,
    "early_stopping_rounds": 100,
}


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    ranker: dict[str, object] = field(default_factory=dict)  # over params.ranker
    settings: dict[str, object] = field(default_factory=dict)  # LightGBM settings over fit_ranker's


LAMBDARANK = {"objective": "lambdarank"}  # named, since the parameters file may choose another objective

SETUPS = (
    Setup("served"),
    Setup("lambdarank", LAMBDARANK),
    Setup("binary", {"objective": "binary"}),
    Setup("xendcg", {"objective": "rank_xendcg"}),
    Setup("lambdarank_truncation_250", LAMBDARANK, settings={"lambdarank_truncation_level": 250}),
    Setup("lambdarank_linear_gain", LAMBDARANK, settings={"label_gain": [0.0, 1.0, 2.0]}),
    Setup("small_data", {**LAMBDARANK, **SMALL_DATA}),
    Setup("binary_small_data", {"objective": "binary", **SMALL_DATA}),
    Setup("binary_31_leaves", {"objective": "binary", "num_leaves": 31, "min_data_in_leaf": 50}),
    Setup("all_negatives", {**LAMBDARANK, "negatives_per_group": ALL_NEGATIVES}),
    Setup("binary_all_negatives", {"objective": "binary", "negatives_per_group": ALL_NEGATIVES}),
    Setup("windows_6", {**LAMBDARANK, "label_windows": 6}),
    Setup("binary_windows_6", {"objective": "binary", "label_windows": 6}),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="names of the setups to run (default: all)")
    args = parser.parse_args()
    base = load_params(args.params)
    setups = [s for s in SETUPS if args.only is None or s.name in args.only]
    data = load_dataset(args.data, base.weights.keys())
    windows = max(int(s.ranker.get("label_windows", base.ranker.label_windows)) for s in setups)  # type: ignore[call-overload]
    with threadpool_limits(1, "blas"):
        parts = label_window_parts(data, base, windows)
        seeds = [base.ranker.seed + s for s in range(args.seeds)]
        for setup in setups:
            started = time.perf_counter()
            params = TrainParams.model_validate(
                base.model_dump() | {"ranker": base.ranker.model_dump() | setup.ranker}
            )
            n = params.ranker.label_windows
            validation = [ranker_ratio(parts[2 : 2 + n], parts[1], (), params, s, setup.settings) for s in seeds]
            test = [ranker_ratio(parts[1 : 1 + n], parts[0], (), params, s, setup.settings) for s in seeds]
            print(f"{setup.name:>26}: ranker / repeat NDCG@{N} validation {np.mean(validation):.4f} "
                  f"(seeds {' '.join(f'{v:.4f}' for v in validation)}), test {np.mean(test):.4f} "
                  f"(seeds {' '.join(f'{v:.4f}' for v in test)}) [{time.perf_counter() - started:.0f} s]",
                  flush=True)


if __name__ == "__main__":
    main()
