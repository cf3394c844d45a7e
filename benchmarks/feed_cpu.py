"""CPU time of `Recommender.feed` in process, per request, for the same users on several variants (issue #4).

A variant is a bundle, optionally with the code of another git revision: `NAME=BUNDLE` or
`NAME=BUNDLE@REV` (REV is extracted with `git archive` into a temp dir and put first on PYTHONPATH).
Each variant runs in its own process, one after the other, on the same request list: user ids drawn as
`serve_load.py` draws them (Zipf over the bundle's users, `--unknown-share` unknown ids), and a share of
the known users given a few events newer than the bundle (the fold-in path of users active since
training). CPU seconds (`time.process_time`, one BLAS / FAISS / LightGBM thread) are what is compared,
because wall-clock time is noisy on a shared machine. Usage:

    uv run python benchmarks/feed_cpu.py --variant before=/tmp/perf/bundle@fb28917 \
        --variant after=/tmp/perf/bundle-pq --requests 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVENT_TYPES = ("view", "view", "view", "add_to_cart", "purchase")


def requests(bundle: Path, count: int, unknown_share: float, online_share: float, seed: int
             ) -> list[dict[str, Any]]:
    """The request list: user id, and for some known users a few events after the bundle's data."""
    import pyarrow.parquet as pq

    users = np.asarray(pq.read_table(bundle / "users.parquet").column("id").to_pylist(), dtype=object)
    items = np.asarray(pq.read_table(bundle / "items.parquet").column("id").to_pylist(), dtype=object)
    manifest = json.loads((bundle / "manifest.json").read_text())
    after = datetime.fromisoformat(manifest["data_window"]["end"]).timestamp() + 60.0
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(users))
    weights = np.arange(1, len(users) + 1, dtype=np.float64) ** -1.1
    cdf = np.cumsum(weights) / weights.sum()
    out: list[dict[str, Any]] = []
    for _ in range(count):
        if rng.random() < unknown_share:
            out.append({"user_id": f"unknown-{rng.integers(10**9)}", "events": []})
            continue
        user = str(users[order[min(np.searchsorted(cdf, rng.random()), len(users) - 1)]])
        events = []
        if rng.random() < online_share:
            for k in range(int(rng.integers(1, 8))):
                item = str(items[min(int(rng.pareto(1.2) * 50), len(items) - 1)])
                events.append([item, EVENT_TYPES[int(rng.integers(len(EVENT_TYPES)))], after + 30.0 * k])
        out.append({"user_id": user, "events": events})
    return out


def measure(bundle_path: str, todo: list[dict[str, Any]], n: int, warmup: int) -> dict[str, Any]:
    """Run in the variant's process: load, warm up on the first `warmup` requests, time the others' feeds."""
    import faiss
    from threadpoolctl import threadpool_limits

    from features.store import OnlineEvent
    from serving.recommender import Recommender, UserContext
    from training.bundle import load_bundle

    threadpool_limits(1)
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    recommender = Recommender(load_bundle(Path(bundle_path)))
    load_s = time.perf_counter() - started

    def context(request: dict[str, Any]) -> UserContext | None:
        if not request["events"]:
            return None
        recent = [OnlineEvent(request["user_id"], item, kind, ts) for item, kind, ts in reversed(request["events"])]
        bought = {item: ts for item, kind, ts in request["events"] if kind == "purchase"}
        return UserContext(recent, bought)

    prepared = [(r["user_id"], context(r)) for r in todo]
    for user_id, ctx in prepared[:warmup]:
        recommender.feed(user_id, n, context=ctx)
    prepared, todo = prepared[warmup:], todo[warmup:]
    kinds: dict[str, list[float]] = {"unknown": [], "known": [], "online": []}
    ranked: list[int] = []
    wall = 0.0
    for (user_id, ctx), request in zip(prepared, todo, strict=True):
        kind = "online" if ctx is not None else (
            "known" if recommender.bundle.users.index_of(user_id) is not None else "unknown")
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = recommender.feed(user_id, n, context=ctx)
        kinds[kind].append(time.process_time() - cpu0)
        wall += time.perf_counter() - wall0
        request["items"] = [i.item_id for i in result.items]
        if result.ranked:
            ranked.append(result.ranked)
    every = [t for values in kinds.values() for t in values]
    return {
        "bundle": bundle_path, "index": type(faiss.downcast_index(recommender.bundle.index)).__name__,
        "load_s": load_s, "requests": len(every),
        "cpu_ms_per_feed": 1000.0 * float(np.sum(every)) / len(every),
        "wall_ms_per_feed": 1000.0 * wall / len(every),
        "cpu_ms_by_kind": {k: {"requests": len(v), "mean": 1000.0 * float(np.mean(v)) if v else None,
                               "p50": 1000.0 * float(np.median(v)) if v else None} for k, v in kinds.items()},
        "ranked": {"requests": len(ranked), "min": min(ranked, default=0),
                   "median": float(np.median(ranked)) if ranked else 0.0},
        "feeds": [r["items"] for r in todo],
    }


def _snapshot(rev: str, into: Path) -> Path:
    """The tree of `rev` (git archive), extracted under `into`."""
    target = into / rev.replace("/", "_")
    if not target.exists():
        archive = into / "tree.tar"
        with archive.open("wb") as out:
            subprocess.run(["git", "archive", rev], cwd=ROOT, stdout=out, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        archive.unlink()
    return target


def _run_variant(bundle: str, rev: str | None, todo_file: Path, n: int, warmup: int, tmp: Path) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if rev is not None:
        env["PYTHONPATH"] = str(_snapshot(rev, tmp))
    out = tmp / "result.json"
    subprocess.run([sys.executable, __file__, "--child", bundle, str(todo_file), str(out), str(n), str(warmup)],
                   env=env, check=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=BUNDLE[@REV]")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1, help="each variant this often, alternating")
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--unknown-share", type=float, default=0.25)
    parser.add_argument("--online-share", type=float, default=0.05, help="known users with events after the bundle")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variants = []
    for spec in args.variant:
        name, _, target = spec.partition("=")
        bundle, _, rev = target.partition("@")
        variants.append((name, str(Path(bundle).resolve()), rev or None))
    todo = requests(Path(variants[0][1]), args.requests + args.warmup, args.unknown_share, args.online_share,
                    args.seed)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory(prefix="feed_cpu.") as tmp:
        todo_file = Path(tmp) / "requests.json"
        todo_file.write_text(json.dumps(todo))
        for _ in range(args.rounds):
            for name, bundle, rev in variants:
                results[name].append(_run_variant(bundle, rev, todo_file, args.n, args.warmup, Path(tmp)))
                print(f"{name}: {results[name][-1]['cpu_ms_per_feed']:.3f} ms CPU per feed", flush=True)
    first = results[variants[0][0]][0]["feeds"]
    summary = {"load_average": os.getloadavg(), "requests": args.requests, "variants": {}}
    print(f"\n| variant | bundle, code | CPU ms per feed (rounds) | known | unknown | online | wall ms | "
          f"ranked min / median | same feeds as {variants[0][0]} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, bundle, rev in variants:
        runs = results[name]
        cpu = [r["cpu_ms_per_feed"] for r in runs]
        by_kind = {k: np.median([r["cpu_ms_by_kind"][k]["mean"] or 0.0 for r in runs]) for k in
                   ("known", "unknown", "online")}
        same = float(np.mean([a == b for a, b in zip(first, runs[0]["feeds"], strict=True)]))
        summary["variants"][name] = {"bundle": bundle, "rev": rev, "index": runs[0]["index"], "cpu_ms": cpu,
                                     "by_kind": by_kind, "ranked": runs[0]["ranked"], "same_feeds": same,
                                     "wall_ms": [r["wall_ms_per_feed"] for r in runs]}
        print(f"| {name} | {Path(bundle).name} ({runs[0]['index']}), {rev or 'working tree'} | "
              f"{np.median(cpu):.2f} ({', '.join(f'{c:.2f}' for c in cpu)}) | {by_kind['known']:.2f} | "
              f"{by_kind['unknown']:.2f} | {by_kind['online']:.2f} | "
              f"{np.median([r['wall_ms_per_feed'] for r in runs]):.2f} | "
              f"{runs[0]['ranked']['min']} / {runs[0]['ranked']['median']:.0f} | {same:.1%} |")
    print(f"\nload average at the end: {summary['load_average']}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, bundle_arg, todo_arg, out_arg, n_arg, warmup_arg = sys.argv
        measured = measure(bundle_arg, json.loads(Path(todo_arg).read_text()), int(n_arg), int(warmup_arg))
        Path(out_arg).write_text(json.dumps(measured))
    else:
        main()
