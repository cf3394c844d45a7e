"""FAISS recall@K of a bundle's item index against exact inner-product search, and its latency per query.

For a sample of the bundle's users (their ALS factors), the exact top-K over `item_factors` is the truth;
the bundle's own index is searched at several efSearch values (one thread, one query at a time, as the
service does) and recall@K and the mean / p99 time per query are reported. With `--try M:efC ...` it also
builds other HNSW indexes over the same vectors, to find a setting that reaches a recall target. The BPR
index the service builds beside the bundle's (`training.index.index_like`) is measured the same way over
the BPR factors. Usage:

    uv run python benchmarks/faiss_recall.py --bundle /tmp/serveload/bundle1m --users 2000 \
        --ef 32 64 128 256 512 --try 32:200 48:200

Reads only the files it needs from the bundle (checksums are verified by `training.bundle.load_bundle`
in the service; here the index, the factors and the manifest are read directly, to keep memory small).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from training.index import index_like


@dataclass(frozen=True, slots=True)
class RecallRow:
    index: str  # "bundle (HNSW M32 efC200)" or "HNSW M48 efC200"
    ef_search: int
    k: int
    recall: float
    ms_mean: float
    ms_p50: float
    ms_p99: float


def _describe(index: faiss.Index) -> str:
    if hasattr(index, "hnsw"):
        return f"HNSW M{index.hnsw.nb_neighbors(1)} efC{index.hnsw.efConstruction}"
    if isinstance(index, faiss.IndexRefine):
        return f"PQ fast scan, exact re-scoring of {index.k_factor:g} x k"
    return type(index).__name__


def _exact_top(items: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(items.shape[1])
    flat.add(items)
    faiss.omp_set_num_threads(2)
    _, truth = flat.search(queries, k)
    faiss.omp_set_num_threads(1)
    return truth


def _measure(index: faiss.Index, name: str, queries: np.ndarray, truth: np.ndarray, k: int,
             ef_values: list[int], timed: int) -> list[RecallRow]:
    rows = []
    hnsw = faiss.downcast_index(index).hnsw if hasattr(faiss.downcast_index(index), "hnsw") else None
    for ef in ef_values:
        if hnsw is not None:
            hnsw.efSearch = ef
        _, found = index.search(queries, k)  # batch, for recall
        hits = [len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True)]
        recall = float(np.sum(hits) / truth.size)
        times = []
        for q in queries[:timed]:  # one query at a time, one thread: as in a request
            start = time.perf_counter()
            index.search(q[None, :], k)
            times.append(time.perf_counter() - start)
        ms = 1000.0 * np.asarray(times)
        rows.append(RecallRow(name, ef if hnsw is not None else 0, k, recall, float(ms.mean()),
                              float(np.percentile(ms, 50)), float(np.percentile(ms, 99))))
        if hnsw is None:
            break
    return rows


def measure_recall(bundle: Path, users: int = 2000, k: int = 200, ef_values: list[int] | None = None,
                   timed: int = 500, extra: list[tuple[int, int]] | None = None,
                   served_k: list[int] | None = None, seed: int = 5) -> dict[str, object]:
    """Recall@k and query time of the bundle's index (and of `extra` HNSW (M, efConstruction) builds)."""
    ef_values = ef_values or [32, 64, 128, 256, 512]
    faiss.omp_set_num_threads(1)
    manifest = json.loads((bundle / "manifest.json").read_text())
    items = np.ascontiguousarray(np.load(bundle / "item_factors.npy"), dtype=np.float32)
    user_factors = np.load(bundle / "user_factors.npy", mmap_mode="r")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(user_factors.shape[0], size=min(users, user_factors.shape[0]), replace=False))
    queries = np.ascontiguousarray(user_factors[sample], dtype=np.float32)
    truth = _exact_top(items, queries, k)
    index = faiss.read_index(str(bundle / "items_ip.faiss"))
    inner = faiss.downcast_index(index)
    rows = _measure(index, f"bundle ({_describe(inner)})", queries, truth, k, ef_values, timed)
    bpr_items = np.ascontiguousarray(np.load(bundle / "bpr_item_factors.npy"), dtype=np.float32)
    bpr_users = np.load(bundle / "bpr_user_factors.npy", mmap_mode="r")
    bpr_queries = np.ascontiguousarray(bpr_users[sample[sample < bpr_users.shape[0]]], dtype=np.float32)
    bpr_queries = bpr_queries[np.isfinite(bpr_queries).all(axis=1)]
    bpr_index = index_like(index, bpr_items)  # as the service builds it when it loads the bundle
    rows += _measure(bpr_index, f"BPR as served ({_describe(faiss.downcast_index(bpr_index))})", bpr_queries,
                     _exact_top(bpr_items, bpr_queries, k), k, [0], timed)
    flat = faiss.IndexFlatIP(items.shape[1])
    flat.add(items)
    rows += _measure(flat, "exact (IndexFlatIP)", queries, truth, k, [0], timed)
    build_seconds: dict[str, float] = {}
    for m, ef_construction in extra or []:
        hnsw = faiss.IndexHNSWFlat(items.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = ef_construction
        faiss.omp_set_num_threads(2)
        start = time.perf_counter()
        hnsw.add(items)
        faiss.omp_set_num_threads(1)
        label = f"HNSW M{m} efC{ef_construction}"
        build_seconds[label] = time.perf_counter() - start
        rows += _measure(hnsw, label, queries, truth, k, ef_values, timed)
    served: list[dict[str, float]] = []
    if hasattr(inner, "hnsw"):  # the service asks for more than k (blocked items + margin): ef is max(efSearch, k)
        inner.hnsw.efSearch = int(manifest["model"]["ef_search"])
        for big_k in served_k or []:
            times = []
            for q in queries[:min(timed, 200)]:
                start = time.perf_counter()
                index.search(q[None, :], big_k)
                times.append(time.perf_counter() - start)
            ms = 1000.0 * np.asarray(times)
            _, found = index.search(queries, big_k)
            within = np.mean([len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth, strict=True)])
            served.append({"k": big_k, "recall_of_exact_top_k_within": float(within), "ms_mean": float(ms.mean()),
                           "ms_p99": float(np.percentile(ms, 99))})
    return {
        "bundle": str(bundle),
        "items": int(items.shape[0]),
        "factors": int(items.shape[1]),
        "users_sampled": len(sample),
        "k": k,
        "manifest_index": manifest["model"]["index_kind"],
        "manifest_ef_search": manifest["model"]["ef_search"],
        "rows": [asdict(r) for r in rows],
        "build_seconds": build_seconds,
        "served_k_search": served,
    }


def markdown(result: dict[str, object]) -> str:
    lines = [f"| index | efSearch | recall@{result['k']} | ms/query mean | p50 | p99 |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:  # type: ignore[attr-defined]
        ef = r["ef_search"] or "-"
        lines.append(f"| {r['index']} | {ef} | {r['recall']:.4f} | {r['ms_mean']:.3f} | {r['ms_p50']:.3f} "
                     f"| {r['ms_p99']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("-k", type=int, default=200)
    parser.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--timed", type=int, default=500, help="queries timed one by one per setting")
    parser.add_argument("--try", dest="extra", nargs="*", default=[], metavar="M:EFC",
                        help="also build HNSW indexes with these M:efConstruction settings")
    parser.add_argument("--served-k", type=int, nargs="*", default=[],
                        help="also time single searches at these k with the manifest's efSearch")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    extra = [tuple(int(x) for x in spec.split(":")) for spec in args.extra]
    result = measure_recall(args.bundle, args.users, args.k, args.ef, args.timed,
                            [(m, e) for m, e in extra], args.served_k)
    print(markdown(result))
    if result["build_seconds"]:
        print("build seconds:", result["build_seconds"])
    if result["served_k_search"]:
        print("searches at the served k:", result["served_k_search"])
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
