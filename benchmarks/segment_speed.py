"""Segment speed at 1M users: a top-10k propensity query, and a 1M-row export streamed with flat memory.

The user and item factors are synthesised (1M x 64 users, 100k x 64 items in 20 categories, low-rank with
noise, the shape of the serving benchmark's bundle), with purchases and other positive events drawn from each
user's category taste (3 and 6 per user by default, so a category has about a quarter of the users as past
buyers or interactors, all of whom a propensity query scores), pairs bought more than once spread over 5-30
day intervals (the reorder timing columns), 10 people each user sees (friends' purchases), and a propensity
model over the features the training fits, with the coefficients fitted on demo 5k (DEMO_COEF; `--fixed`: none,
the formula of older bundles). The engine is the
service's (serving.segments) with an in-process online store checking erasure and consent of every member.
FAISS runs on one thread, as in the service. RSS is sampled every 10 ms while the export streams.

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
from features.propensity import FEATURE_NAMES, PROPENSITY_VERSION, PropensityContext, PropensityModel
from features.state import ITEM_WINDOWS_DAYS, USER_EVENT_TYPES
from features.vocab import Vocabulary
from serving.privacy import Privacy
from serving.segment_schemas import PropensityQuery
from serving.segment_service import Segments
from serving.segment_snapshots import SnapshotStore
from serving.segments import SegmentEngine


def _pairs(rng: np.random.Generator, taste: np.ndarray, by_category: list[np.ndarray], per_user: float,
           now: float, days: float, shape: tuple[int, int]) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """users x items: Poisson(per_user) events per user, each in a category drawn from the user's taste;
    the count per pair and the epoch seconds of the last one."""
    n_users = shape[0]
    counts = rng.poisson(per_user, n_users)
    users = np.repeat(np.arange(n_users), counts)
    cumulative = np.cumsum(taste[users], axis=1)
    category = (cumulative < rng.random(len(users))[:, None] * cumulative[:, -1:]).sum(axis=1)
    category = np.minimum(category, len(by_category) - 1)
    sizes = np.asarray([len(items) for items in by_category])
    offsets = (rng.random(len(users)) ** 2 * sizes[category]).astype(np.int64)  # popular items first
    items = np.concatenate(by_category)[np.concatenate([[0], np.cumsum(sizes)[:-1]])[category] + offsets]
    ts = now - rng.exponential(days * 86_400, len(users))
    count = sp.csr_matrix((np.ones(len(users)), (users, items)), shape=shape)
    count.sum_duplicates()
    frame = pd.DataFrame({"u": users, "i": items, "t": ts}).groupby(["u", "i"])["t"].max()
    last = sp.csr_matrix((frame.to_numpy(), (frame.index.get_level_values(0), frame.index.get_level_values(1))),
                         shape=shape)
    return count, last


# Per standard deviation, the category model `sharefeed train` fitted on demo 5k (feature version 2): weight on
# both ALS columns, which is what decides how many candidates a query can skip (PropensityContext.best_probability).
DEMO_COEF = (0.05, 0.05, 0.15, 0.24, 0.40, 0.45, -0.06, 0.05, 0.06, 0.05, 0.02, 0.02, -0.03, 0.15, 0.16, 0.17, -0.05,
             -0.11, -0.08, -0.09, -0.03, 0.0)


def synthetic_model(state: Any, user_factors: np.ndarray, item_factors: np.ndarray, kind: str) -> PropensityModel:
    """The demo model's coefficients (per standard deviation) on this bundle's features: their means and scales
    are those of the features of 50,000 users drawn at random, against the first category."""
    context = PropensityContext(state, user_factors, item_factors)
    codes = np.asarray(state.item_category)
    sample = np.sort(np.random.default_rng(1).choice(len(user_factors), min(50_000, len(user_factors)), replace=False))
    x = context.features(context.target(np.flatnonzero(codes == 0)), sample)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    return PropensityModel(version=PROPENSITY_VERSION, kind=kind, features=list(FEATURE_NAMES),  # type: ignore[arg-type]
                           mean=x.mean(axis=0).tolist(), scale=scale.tolist(), coef=list(DEMO_COEF), intercept=-5.0,
                           label_days=30.0, rows=0, positives=0, targets=0)


def synthetic_bundle(n_users: int, n_items: int, factors: int, categories: int, purchases: float, touches: float,
                     fitted: bool, friends: int = 10, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    now = time.time()
    topics = rng.normal(size=(categories, factors)).astype(np.float32)
    item_cat = rng.integers(0, categories, n_items)
    items = (topics[item_cat] + 0.5 * rng.normal(size=(n_items, factors))).astype(np.float32) / 4
    taste = rng.dirichlet(np.full(categories, 0.3), n_users).astype(np.float32)
    users = (taste @ topics + 0.3 * rng.normal(size=(n_users, factors)).astype(np.float32)) / 4
    by_category = [np.flatnonzero(item_cat == c) for c in range(categories)]
    shape = (n_users, n_items)
    bought, last_bought = _pairs(rng, taste, by_category, purchases, now, 90.0, shape)
    _, last_touch = _pairs(rng, taste, by_category, touches, now, 60.0, shape)
    last_touch = last_touch.maximum(last_bought).tocsr()
    # reorder timing: a pair bought n times spans n - 1 intervals of 5-30 days before the last purchase
    first_bought = last_bought.copy()
    first_bought.data -= (bought.data - 1) * rng.uniform(5, 30, bought.nnz) * 86_400
    # whom each user sees (friends, followed): `friends` people drawn at random
    sees = sp.csr_matrix((np.ones(n_users * friends, dtype=np.float32),
                          (np.repeat(np.arange(n_users), friends), rng.integers(0, n_users, n_users * friends))),
                         shape=(n_users, n_users))
    sees.sum_duplicates()
    last_seen = np.asarray(last_touch.max(axis=1).todense()).ravel()
    buyers = np.asarray(bought.getnnz(axis=0), dtype=np.float32)
    type_counts = np.zeros((n_users, len(USER_EVENT_TYPES)), dtype=np.float32)
    type_counts[:, USER_EVENT_TYPES.index("view")] = last_touch.getnnz(axis=1)
    type_counts[:, USER_EVENT_TYPES.index("purchase")] = np.asarray(bought.sum(axis=1)).ravel()
    window_counts = np.repeat(buyers[:, None], len(ITEM_WINDOWS_DAYS) + 1, axis=1)
    state = SimpleNamespace(item_category=item_cat, item_buyers=buyers, item_window_counts=window_counts,
                            pair_purchases=bought, cutoff_seconds=now, pair_last_purchase=last_bought,
                            pair_last=last_touch, user_type_counts=type_counts, pair_baskets=bought,
                            pair_first_purchase=first_bought, user_sees=sees,
                            user_last_seen=np.where(last_seen > 0, last_seen, np.nan))
    users = users.astype(np.float32)
    model = synthetic_model(state, users, items, "category") if fitted else None
    manifest = SimpleNamespace(categories=[f"c{k}" for k in range(categories)], brands=[],
                               propensity={"category": model, "item": model.model_copy(update={"kind": "item"})}
                               if model is not None else {})
    return SimpleNamespace(user_factors=users, item_factors=items, state=state, manifest=manifest,
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
    parser.add_argument("--purchases", type=float, default=3.0, help="purchases per user (Poisson mean)")
    parser.add_argument("--touches", type=float, default=6.0, help="other positive events per user (Poisson mean)")
    parser.add_argument("--friends", type=int, default=10, help="people each user sees (the social graph)")
    parser.add_argument("--fixed", action="store_true", help="no fitted model: the fixed formula of older bundles")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    bundle = synthetic_bundle(args.users, args.items, args.factors, 20, args.purchases, args.touches, not args.fixed,
                              args.friends)
    print(f"synthetic bundle built in {time.perf_counter() - started:.0f}s: {bundle.state.pair_purchases.nnz:,} "
          f"bought and {bundle.state.pair_last.nnz:,} touched user-item pairs, "
          f"{'fixed formula' if args.fixed else 'fitted model'}")
    engine = SegmentEngine(bundle)
    store = MemoryStore()
    for k in range(0, args.users, 1000):  # a few erased and opted-out users, as in production
        store.erase_user(f"u{k}")
        store.set_consent(f"u{k + 1}", {"marketing": False})
    privacy = Privacy(ControlLedger(Path(tempfile.mkdtemp(prefix="segspeed-log-"))), store)
    started = time.perf_counter()
    engine.user_index()
    print(f"user index ({args.users:,} x {args.factors}, flat IP) built in {time.perf_counter() - started:.2f}s")
    started = time.perf_counter()
    if not args.fixed:
        context = engine.propensity_context()
        print(f"propensity context (column-ordered pair matrices) built in {time.perf_counter() - started:.2f}s")
        codes = np.asarray(bundle.state.item_category)
        reached = [len(context.target(np.flatnonzero(codes == c)).interactors()) for c in range(3)]
        print(f"interactors (past buyers or touchers) per category: {', '.join(f'{r:,}' for r in reached)}, ...")
    for target in ({"category": "c19"}, {"item_id": f"i{args.items - 1}"}):  # per-bundle caches built on first use
        started = time.perf_counter()
        engine.evaluate(PropensityQuery.model_validate({"kind": "propensity", "size": args.top, **target}), privacy)
        print(f"first {next(iter(target))} query (builds the per-bundle caches): "
              f"{(time.perf_counter() - started) * 1000:.0f} ms")
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
