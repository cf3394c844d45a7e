"""Segment speed at 1M users: a top-10k propensity query, and a 1M-row export streamed with flat memory.

The user and item factors are synthesised (1M x 64 users, 100k x 64 items in 20 categories, low-rank with
noise, the shape of the serving benchmark's bundle); the engine is the service's (serving.segments) with
an in-process online store checking erasure and consent of every member. FAISS runs on one thread, as in
the service. RSS is sampled every 10 ms while the export streams.

    OMP_NUM_THREADS=1 nice -n 10 uv run python benchmarks/segment_speed.py --users 1000000
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faiss
import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp

from features.ledger import ControlLedger
from features.online import MemoryStore
from features.vocab import Vocabulary
from serving.privacy import Privacy
from serving.segment_schemas import PropensityQuery
from serving.segment_service import Segments
from serving.segment_snapshots import SnapshotStore
from serving.segments import SegmentEngine


def synthetic_bundle(n_users: int, n_items: int, factors: int, categories: int, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    now = time.time()
    topics = rng.normal(size=(categories, factors)).astype(np.float32)
    item_cat = rng.integers(0, categories, n_items)
    items = (topics[item_cat] + 0.5 * rng.normal(size=(n_items, factors))).astype(np.float32) / 4
    taste = rng.dirichlet(np.full(categories, 0.3), n_users).astype(np.float32)
    users = (taste @ topics + 0.3 * rng.normal(size=(n_users, factors)).astype(np.float32)) / 4
    state = SimpleNamespace(item_category=item_cat, item_buyers=rng.poisson(5, n_items).astype(np.float32),
                            pair_purchases=sp.csr_matrix((n_users, n_items)), cutoff_seconds=now,
                            pair_last_purchase=sp.csr_matrix((n_users, n_items)),
                            user_last_seen=now - rng.exponential(30 * 86_400, n_users))
    manifest = SimpleNamespace(categories=[f"c{k}" for k in range(categories)], brands=[])
    return SimpleNamespace(user_factors=users.astype(np.float32), item_factors=items, state=state, manifest=manifest,
                           users=Vocabulary.from_ids(pd.Series([f"u{k}" for k in range(n_users)])),
                           items=Vocabulary.from_ids(pd.Series([f"i{k}" for k in range(n_items)])),
                           version="synthetic", path=Path("/nonexistent"))


class PeakRSS:
    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--top", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    bundle = synthetic_bundle(args.users, args.items, args.factors, 20)
    engine = SegmentEngine(bundle)
    store = MemoryStore()
    for k in range(0, args.users, 1000):  # a few erased and opted-out users, as in production
        store.erase_user(f"u{k}")
        store.set_consent(f"u{k + 1}", {"marketing": False})
    privacy = Privacy(ControlLedger(Path(tempfile.mkdtemp(prefix="segspeed-log-"))), store)
    started = time.perf_counter()
    engine.user_index()
    print(f"user index ({args.users:,} x {args.factors}, flat IP) built in {time.perf_counter() - started:.2f}s")
    times = {"category": [], "item": [], "category, active filter": []}
    for r in range(args.repeats):
        for label, query in (
            ("category", PropensityQuery(kind="propensity", category=f"c{r % 20}", size=args.top)),
            ("item", PropensityQuery(kind="propensity", item_id=f"i{r}", size=args.top)),
            ("category, active filter", PropensityQuery.model_validate(
                {"kind": "propensity", "category": f"c{r % 20}", "size": args.top, "filters": {"active_days": 30}})),
        ):
            t = time.perf_counter()
            members = engine.evaluate(query, privacy)
            times[label].append(time.perf_counter() - t)
            assert len(members.user_idx) == args.top
    for label, values in times.items():
        ms = np.asarray(values) * 1000
        print(f"propensity top-{args.top:,} ({label}): median {np.median(ms):.0f} ms, p90 "
              f"{np.percentile(ms, 90):.0f} ms over {len(ms)} queries")

    with tempfile.TemporaryDirectory(prefix="segspeed-") as tmp:
        snapshots = SnapshotStore(Path(tmp), 3600)
        rng = np.random.default_rng(1)
        scores = np.sort(rng.random(args.users).astype(np.float32))[::-1]
        t = time.perf_counter()
        meta = snapshots.create(bundle.users.ids, scores, {"kind": "lifecycle"}, "synthetic")
        print(f"snapshot of {args.users:,} rows written in {time.perf_counter() - t:.2f}s")
        segments = Segments(engine, snapshots, privacy)
        for fmt in ("csv", "parquet"):
            with PeakRSS() as rss:
                t = time.perf_counter()
                stream = segments.export(meta.segment_id, fmt, lambda *_: None)
                size = sum(len(chunk) for chunk in stream)
                seconds = time.perf_counter() - t
            print(f"export {fmt}: {args.users:,} rows in {seconds:.2f}s = {args.users / seconds:,.0f} rows/s, "
                  f"{size / 1e6:.0f} MB, RSS {rss.start / 2**20:,.0f} MiB before, peak +"
                  f"{(rss.peak - rss.start) / 2**20:,.0f} MiB while streaming")


if __name__ == "__main__":
    main()
