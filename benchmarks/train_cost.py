"""What `sharefeed train` costs next to the bare implicit ALS fit on the same matrix.

For each data set, in one run: (1) `sharefeed train` in a child process: wall time and peak memory;
(2) a child process that builds the same users x items matrix and times only implicit's `fit` with the
same parameters. The ratio says what validation, the holdout evaluation, the refit, the index and
MLflow add on top of the model fit. Usage:

    uv run python benchmarks/train_cost.py [--data ../shared/data/amazon ../shared/data/epinions]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = [ROOT.parent / "shared" / "data" / "amazon", ROOT.parent / "shared" / "data" / "epinions"]


EVALUATED = {"als", "bpr", "item_knn", "repeat", "union_rrf", "ranker", "popular", "trending"} | {
    f"popular_{w}" for w in ("7d", "30d", "180d", "all", "trending")}
STAGE = re.compile(r"^\[(?P<stage>[^\]]+)\] done in (?P<seconds>[0-9.]+)s$", re.MULTILINE)


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MiB of the child, and its stdout and stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {status}:\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, out


def bare_fit(data_dir: Path) -> None:
    """Child mode: build the refit matrix as training does, then time implicit's fit alone."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from features.dataset import load_dataset
    from features.interactions import scale_confidence, user_items_matrix
    from features.vocab import Vocabulary
    from training.params import TrainParams
    from training.window import item_vocabulary

    params = TrainParams()
    data = load_dataset(data_dir, params.weights.keys())
    users = Vocabulary.from_ids(data.events["user_id"])
    items = item_vocabulary(data.events, data.items)
    matrix = scale_confidence(user_items_matrix(data.events, users, items, params.weights),
                              params.als.confidence_scale)
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=params.als.factors, regularization=params.als.regularization,
                                        alpha=params.als.alpha, iterations=params.als.iterations,
                                        random_state=params.als.seed)
        start = time.perf_counter()
        model.fit(matrix, show_progress=False)
        print(f"{time.perf_counter() - start:.3f} {matrix.shape[0]} {matrix.shape[1]} {matrix.nnz}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_fit(args.bare)
        return
    rows = []
    stages: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, SHAREFEED_HOME=str(Path(tmp) / "home"))
        # Create the MLflow store first: its one-time schema set-up is not a cost of each training run.
        init = "from training.settings import TrainingSettings; import mlflow; " \
               "s = TrainingSettings(); s.home.mkdir(parents=True); " \
               "mlflow.MlflowClient(s.tracking_uri).search_experiments()"
        _run([sys.executable, "-c", init], env)
        for data_dir in args.data:
            out = Path(tmp) / f"bundle-{data_dir.name}"
            wall, rss, log = _run([sys.executable, "-m", "sharefeed.cli", "train", "--data", str(data_dir),
                                   "--out", str(out)], env)
            stages[data_dir.name] = {m["stage"]: float(m["seconds"]) for m in STAGE.finditer(log)}
            evaluation = [line for line in log.splitlines()
                          if line.startswith(("evaluated ", "ranker / best", "holdout:")) or "ndcg_at_20" in line
                          or line.split(" ", 1)[0] in EVALUATED]
            print(f"--- {data_dir.name}: holdout evaluation printed by train ---\n" + "\n".join(evaluation), flush=True)
            _, bare_rss, bare_out = _run([sys.executable, __file__, "--bare", str(data_dir)], env)
            fit_s, n_users, n_items, nnz = bare_out.split()[-4:]
            rows.append((data_dir.name, f"{int(n_users):,} x {int(n_items):,} ({int(nnz):,} cells)", wall, rss,
                         float(fit_s), bare_rss))
            print(f"{data_dir.name}: train {wall:.1f}s / {rss:.0f} MiB; bare fit {float(fit_s):.1f}s", flush=True)
    print("\n| data set | matrix | `sharefeed train` wall | peak RSS | bare implicit `fit` | ratio | "
          "bare process peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, shape, wall, rss, fit_s, bare_rss in rows:
        print(f"| {name} | {shape} | {wall:.1f} s | {rss:.0f} MiB | {fit_s:.1f} s | {wall / fit_s:.1f}x | "
              f"{bare_rss:.0f} MiB |")
    names = list(stages)
    print("\nWall time per stage of `sharefeed train` (seconds; the rest is start-up, imports and MLflow logging):\n")
    print("| stage | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for stage in dict.fromkeys(s for per in stages.values() for s in per):
        print(f"| {stage} | " + " | ".join(f"{stages[n].get(stage, 0.0):.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
