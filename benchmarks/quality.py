"""The one source of sharefeed's quality figures: split outside the product, train and recommend as a user
would, score what `recommend` wrote against plain baselines fitted on the same split in the same run.

For each data directory and protocol:
- random: per user, distinct (user, item) pairs split 8:1:1 (train, validation, test) at random, one split per
  seed; every event of a pair goes with it. time (where time has order): the test is the last bucket of
  bucketed data, else the events from the day boundary at the 90% quantile; validation is the part before it
  cut the same way.
- sharefeed gets train + validation as a data directory and runs `sharefeed train --protocol P` then
  `sharefeed recommend -n 20`; nothing else is passed (no params file, no environment besides its home).
- the baselines choose their settings on validation (fitted on train), are refit on train + validation and
  write their lists for the same test users: popularity (window chosen on validation, and all-time),
  implicit ALS untuned (64 factors, reg 0.05, alpha 1, 15 iterations, summed weights view 1, cart 3,
  purchase 8, share 5) and at the library's defaults, BM25 item-kNN (K 200, K1 1.2, B 0.75), EASE (catalogs
  up to 20k items; lambda from {10, 50, 100, 200, 500, 1000, 3000} on validation), and each user's own repeat
  purchases where repurchase is allowed.
- relevant: test pairs the user had no interaction with before the test, plus repeat purchases of items
  whose category is bought again (the share of repeat buyers per category, 10% or more over 20 pairs).
  Every baseline list leaves out the user's earlier items except those repeat buys: nothing that cannot be
  relevant takes a seat. sharefeed's lines are scored as written.

Run: `uv run python benchmarks/quality.py --data ../shared/data/amazon [--data ...] --seeds 3 --out q.json`;
`--markdown` prints the tables of docs/quality.md from one or more JSON results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

K = 20
BASELINE_WEIGHTS = {"view": 1.0, "add_to_cart": 3.0, "purchase": 8.0, "share": 5.0}
EASE_LAMBDAS = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 3000.0)
EASE_MAX_ITEMS = 20_000
POPULARITY_DAYS = (1, 7, 30, 90, 365)
MAX_BUCKETS = 60
REPEAT_SHARE, REPEAT_MIN_PAIRS = 0.1, 20
BOOTSTRAP = 1000
SHAREFEED = str(Path(sys.executable).parent / "sharefeed")  # the console script of this environment


# --- reading and splitting ----------------------------------------------------------------------------------

def read_events(data_dir: Path) -> tuple[pd.DataFrame, Path]:
    files = sorted(p for p in data_dir.iterdir() if p.name.startswith("events."))
    if len(files) != 1:
        raise SystemExit(f"{data_dir}: expected one events file, found {[p.name for p in files]}")
    path = files[0]
    frame = pd.read_parquet(path) if path.name.endswith(".parquet") else pd.read_csv(path, dtype=str,
                                                                                       keep_default_na=False)
    raw = frame["timestamp"]
    numeric = pd.to_numeric(raw, errors="coerce") if raw.dtype == object else None
    if numeric is not None and numeric.notna().all():
        ts = pd.to_datetime(numeric, unit="s", utc=True)
    else:
        ts = pd.to_datetime(raw, utc=True, format="ISO8601")
    frame = frame.assign(user_id=frame["user_id"].astype(str), item_id=frame["item_id"].astype(str))
    return frame.assign(_ts=ts), path


@dataclass(frozen=True)
class Split:
    name: str
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame


def random_split(events: pd.DataFrame, seed: int) -> Split:
    """Per user, distinct pairs at evenly spaced random positions: the first 80% train, then 10%, 10%."""
    rng = np.random.default_rng(seed)
    pairs = events[["user_id", "item_id"]].drop_duplicates().reset_index(drop=True)
    pairs = pairs.iloc[rng.permutation(len(pairs))].reset_index(drop=True)
    rank = pairs.groupby("user_id", sort=False).cumcount().to_numpy()
    size = pairs.groupby("user_id", sort=False)["user_id"].transform("size").to_numpy()
    offset = pd.Series(rng.random(len(pairs))).groupby(pairs["user_id"], sort=False).transform("first").to_numpy()
    position = (rank + offset) / size
    part = np.where(position < 0.8, 0, np.where(position < 0.9, 1, 2))
    part[size < 3] = 0  # a user with one or two items has nothing to spare
    label = pairs.assign(part=part).set_index(["user_id", "item_id"])["part"]
    at = label.reindex(pd.MultiIndex.from_frame(events[["user_id", "item_id"]])).to_numpy()
    return Split(f"random seed {seed}", events[at == 0], events[at == 1], events[at == 2])


def time_cuts(ts: pd.Series) -> tuple[pd.Timestamp, pd.Timestamp, str]:
    """(validation start, test start) on the data's own resolution."""
    times = np.sort(ts.unique())
    if len(times) <= MAX_BUCKETS:
        return pd.Timestamp(times[-2]), pd.Timestamp(times[-1]), f"{len(times)} buckets: last two"
    test = ts.quantile(0.9).floor("D")
    valid = ts.quantile(0.8).floor("D")
    if valid >= test:  # most events on few days: the day before the test
        valid = pd.Timestamp(np.sort(ts.loc[ts < test].dt.floor("D").unique())[-1])
    return valid, test, "day boundaries at the 80% and 90% quantiles"


def time_split(events: pd.DataFrame) -> Split:
    valid_at, test_at, how = time_cuts(events["_ts"])
    ts = events["_ts"]
    return Split(f"time ({how}; test from {test_at:%Y-%m-%d})", events[ts < valid_at],
                 events[(ts >= valid_at) & (ts < test_at)], events[ts >= test_at])


# --- targets and policy -------------------------------------------------------------------------------------

def repeatable_items(before: pd.DataFrame, item_category: dict[str, str]) -> set[str]:
    """Items whose category (or, without categories, the data as a whole) is bought again."""
    buys = before.loc[before["event_type"] == "purchase"]
    occasions = buys.groupby(["user_id", "item_id"])["_ts"].nunique().reset_index()
    occasions["category"] = occasions["item_id"].map(item_category).astype(object).fillna("")
    rates = occasions.groupby("category")["_ts"].agg(pairs="size", again=lambda s: float((s >= 2).mean()))
    overall = float((occasions["_ts"] >= 2).mean()) if len(occasions) else 0.0
    default = len(occasions) >= REPEAT_MIN_PAIRS and overall >= REPEAT_SHARE
    again = {c for c, r in rates.iterrows() if (r["again"] >= REPEAT_SHARE if r["pairs"] >= REPEAT_MIN_PAIRS
                                                else default)}
    items = before["item_id"].unique()
    return {i for i in items if item_category.get(i, "") in again or (i not in item_category and default)}


def relevant(before: pd.DataFrame, after: pd.DataFrame, again: set[str]) -> dict[str, set[str]]:
    seen = set(zip(before["user_id"], before["item_id"], strict=True))
    bought = set(zip(*[before.loc[before["event_type"] == "purchase", c] for c in ("user_id", "item_id")],
                     strict=True))
    out: dict[str, set[str]] = {}
    for user, item, kind in zip(after["user_id"], after["item_id"], after["event_type"], strict=True):
        if (user, item) not in seen or (kind == "purchase" and item in again and (user, item) in bought):
            out.setdefault(user, set()).add(item)
    return out


def ndcg(recs: list[str], rel: set[str], k: int) -> float:
    gains = [1.0 / np.log2(i + 2) for i, item in enumerate(recs[:k]) if item in rel]
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(rel), k)))
    return float(sum(gains) / ideal) if ideal else 0.0


def metrics(lists: dict[str, list[str]], targets: dict[str, set[str]], users: list[str]) -> dict[str, np.ndarray]:
    rows: dict[str, list[float]] = {"ndcg_at_10": [], "ndcg_at_20": [], "recall_at_20": [], "hit_rate_at_20": []}
    for user in users:
        recs, rel = lists.get(user, []), targets[user]
        hits = len(set(recs[:K]) & rel)
        rows["ndcg_at_10"].append(ndcg(recs, rel, 10))
        rows["ndcg_at_20"].append(ndcg(recs, rel, 20))
        rows["recall_at_20"].append(hits / len(rel))
        rows["hit_rate_at_20"].append(float(hits > 0))
    return {k: np.asarray(v) for k, v in rows.items()}


# --- baselines ----------------------------------------------------------------------------------------------

class Matrix:
    """Users x items of summed baseline weights over a part, on fixed vocabularies."""

    def __init__(self, frame: pd.DataFrame, users: pd.Index, items: pd.Index) -> None:
        weights = frame["event_type"].map(BASELINE_WEIGHTS).fillna(1.0).to_numpy(np.float32)
        rows, cols = users.get_indexer(frame["user_id"]), items.get_indexer(frame["item_id"])
        keep = (rows >= 0) & (cols >= 0)
        m = sp.csr_matrix((weights[keep], (rows[keep], cols[keep])), shape=(len(users), len(items)))
        m.sum_duplicates()
        m.data = np.maximum(m.data, 0)
        m.eliminate_zeros()
        self.m = m


def top_lists(scores_for, users: list[str], user_index: pd.Index, items: pd.Index, blocked: dict[str, set[str]],
              fill: list[str]) -> dict[str, list[str]]:
    """Each user's best K items by `scores_for(rows)` (chunks of user rows), blocked items out, popular fill."""
    out: dict[str, list[str]] = {}
    rows = user_index.get_indexer(users)
    known = [(u, r) for u, r in zip(users, rows, strict=True) if r >= 0]
    item_ids = np.asarray(items)
    for start in range(0, len(known), 512):
        chunk = known[start:start + 512]
        scores = np.asarray(scores_for(np.asarray([r for _, r in chunk])), dtype=np.float64)
        for (user, _), row in zip(chunk, scores, strict=True):
            ban = blocked.get(user, set())
            take = min(len(row), K + len(ban) + 1)
            best = np.argpartition(-row, take - 1)[:take] if take < len(row) else np.arange(len(row))
            best = best[np.lexsort((best, -row[best]))]
            picks = [str(item_ids[i]) for i in best if np.isfinite(row[i]) and item_ids[i] not in ban][:K]
            out[user] = picks
    for user in users:
        picks = out.setdefault(user, [])
        ban = blocked.get(user, set())
        for item in fill:
            if len(picks) >= K:
                break
            if item not in ban and item not in picks:
                picks.append(item)
    return out


def first_open(order: list[str], ban: set[str]) -> list[str]:
    """The first K items of `order` that are not banned, each once (stops as soon as it has them)."""
    picks: list[str] = []
    for item in order:
        if item not in ban and item not in picks:
            picks.append(item)
            if len(picks) == K:
                break
    return picks


def popular_order(frame: pd.DataFrame, now: pd.Timestamp, days: int | None) -> list[str]:
    part = frame if days is None else frame.loc[frame["_ts"] > now - pd.Timedelta(days=days)]
    counts = part.groupby("item_id")["user_id"].nunique()
    return list(counts.sort_values(ascending=False, kind="stable").index)


def fit_als(m: sp.csr_matrix, default: bool):
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        model = (AlternatingLeastSquares(random_state=0) if default else
                 AlternatingLeastSquares(factors=64, regularization=0.05, alpha=1.0, iterations=15, random_state=0))
        model.fit(m, show_progress=False)
    return lambda rows: model.user_factors[rows] @ model.item_factors.T


def fit_bm25(m: sp.csr_matrix):
    from implicit.nearest_neighbours import ItemItemRecommender, bm25_weight
    from threadpoolctl import threadpool_limits

    weighted = bm25_weight(m.T.tocsr(), K1=1.2, B=0.75).T.tocsr()
    model = ItemItemRecommender(K=200)
    with threadpool_limits(1, "blas"):
        model.fit(weighted, show_progress=False)
    sim = model.similarity.tocsr()
    return lambda rows: (m[rows] @ sim).toarray()


def ease_scorer(m: sp.csr_matrix, lam: float):
    x = m.copy().astype(np.float64)
    x.data[:] = 1.0
    n_users, n_items = x.shape
    if n_users < n_items:  # (X'X + lam I)^-1 through the users x users system
        inner = np.linalg.inv((x @ x.T).toarray() + lam * np.eye(n_users))
        dense = x.toarray()
        p = -(dense.T @ (inner @ dense))
        p[np.diag_indices_from(p)] += 1.0
        p /= lam
    else:
        p = np.linalg.inv((x.T @ x).toarray() + lam * np.eye(n_items))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return lambda rows: x[rows] @ b


def repeat_scorer(frame: pd.DataFrame, users: pd.Index, items: pd.Index, again: set[str]):
    buys = frame.loc[(frame["event_type"] == "purchase") & frame["item_id"].isin(again)]
    m = Matrix(buys.assign(event_type="view"), users, items).m.tocsr()
    last = frame["_ts"].max()
    recency = buys.groupby(["user_id", "item_id"])["_ts"].max()
    bonus = sp.csr_matrix(m.shape)
    if len(recency):
        r = users.get_indexer(recency.index.get_level_values(0))
        c = items.get_indexer(recency.index.get_level_values(1))
        age = (last - recency).dt.total_seconds().to_numpy() / 86_400
        bonus = sp.csr_matrix((np.power(0.5, age / 30.0), (r, c)), shape=m.shape)

    def scores(rows: np.ndarray) -> np.ndarray:
        s = (m[rows] + bonus[rows]).toarray()
        s[s <= 0] = -np.inf
        return s

    return scores


def baselines(split: Split, users: list[str], blocked: dict[str, set[str]], valid_targets: dict[str, set[str]],
              again: set[str]) -> tuple[dict[str, dict[str, list[str]]], dict[str, str]]:
    """Every baseline's lists for `users` (refit on train + validation), and what validation chose."""
    before = pd.concat([split.train, split.valid])
    chosen: dict[str, str] = {}
    v_users = sorted(valid_targets)
    t_users, t_items = pd.Index(sorted(split.train["user_id"].unique())), pd.Index(sorted(before["item_id"].unique()))
    f_users = pd.Index(sorted(before["user_id"].unique()))
    m_train, m_all = Matrix(split.train, t_users, t_items).m, Matrix(before, f_users, t_items).m
    v_blocked = blocked_items(split.train, again)

    def v_score(lists: dict[str, list[str]]) -> float:
        return float(metrics(lists, valid_targets, v_users)["ndcg_at_20"].mean())

    train_now, now = split.train["_ts"].max(), before["_ts"].max()
    windows = {f"{d}d": d for d in POPULARITY_DAYS} | {"all": None}
    orders = {w: popular_order(split.train, train_now, days) for w, days in windows.items()}
    best_window = max(windows, key=lambda w: v_score({u: first_open(orders[w], v_blocked.get(u, set()))
                                                      for u in v_users}))
    chosen["popular_recent"] = best_window
    fill = popular_order(before, now, None)
    out: dict[str, dict[str, list[str]]] = {}
    for name, days in (("popular_recent", windows[best_window]), ("popular_all", None)):
        order = popular_order(before, now, days) + fill
        out[name] = {u: first_open(order, blocked.get(u, set())) for u in users}
    out["als_untuned"] = top_lists(fit_als(m_all, False), users, f_users, t_items, blocked, fill)
    out["als_defaults"] = top_lists(fit_als(m_all, True), users, f_users, t_items, blocked, fill)
    out["bm25_knn"] = top_lists(fit_bm25(m_all), users, f_users, t_items, blocked, fill)
    if len(t_items) <= EASE_MAX_ITEMS:
        t_fill = popular_order(split.train, train_now, None)

        def ease_valid(lam: float) -> float:
            return v_score(top_lists(ease_scorer(m_train, lam), v_users, t_users, t_items, v_blocked, t_fill))

        lam = _unimodal_pick(EASE_LAMBDAS, ease_valid)
        chosen["ease_lambda"] = f"{lam:g}"
        out["ease"] = top_lists(ease_scorer(m_all, lam), users, f_users, t_items, blocked, fill)
    if again:
        out["repeat"] = top_lists(repeat_scorer(before, f_users, t_items, again), users, f_users, t_items,
                                  {u: b for u, b in blocked.items()}, fill)
    return out, chosen


def _unimodal_pick(grid: tuple[float, ...], score) -> float:
    """The best grid value, walking from the middle towards the better neighbour while it improves."""
    cache: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in cache:
            cache[i] = score(grid[i])
        return cache[i]

    i = len(grid) // 2
    step = 1 if at(min(i + 1, len(grid) - 1)) > at(i) else -1
    while 0 <= i + step < len(grid) and at(i + step) > at(i):
        i += step
    return grid[i]


def blocked_items(before: pd.DataFrame, again: set[str]) -> dict[str, set[str]]:
    """Per user: items interacted with before, except purchases of items bought again."""
    bought_again = before.loc[(before["event_type"] == "purchase") & before["item_id"].isin(again)]
    keep = set(zip(bought_again["user_id"], bought_again["item_id"], strict=True))
    out: dict[str, set[str]] = {}
    for user, item in set(zip(before["user_id"], before["item_id"], strict=True)):
        if (user, item) not in keep:
            out.setdefault(user, set()).add(item)
    return out


# --- sharefeed, as a user runs it ---------------------------------------------------------------------------

def run_sharefeed(data_dir: Path, events_path: Path, part: pd.DataFrame, users: list[str], protocol: str,
                  work: Path) -> tuple[dict[str, list[str]], dict[str, object]]:
    folder = work / "data"
    folder.mkdir(parents=True)
    out = folder / events_path.name
    frame = part.drop(columns=["_ts"])
    frame.to_parquet(out, index=False) if out.name.endswith(".parquet") else frame.to_csv(out, index=False)
    for other in data_dir.iterdir():
        if other.is_file() and other.name.split(".")[0] in ("items", "users", "social"):
            (folder / other.name).symlink_to(other.resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREFEED_")}
    env["SHAREFEED_HOME"] = str(work / "home")  # the embedded MLflow store of this run only
    (work / "users.txt").write_text("\n".join(users) + "\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    train = subprocess.run([SHAREFEED, "train", "--data", str(folder), "--out",
                            str(work / "bundle"), "--protocol", protocol, "--rejects", str(work / "rejects.csv")],
                           env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    (work / "train.log").write_text(train.stderr + train.stdout)
    if train.returncode:
        raise RuntimeError(f"sharefeed train failed:\n{train.stderr[-3000:]}")
    rec = subprocess.run([SHAREFEED, "recommend", "--bundle", str(work / "bundle"),
                          "--users", str(work / "users.txt"), "-n", str(K), "--out", str(work / "recs.jsonl")],
                         env=env, capture_output=True, text=True)
    if rec.returncode:
        raise RuntimeError(f"sharefeed recommend failed:\n{rec.stderr[-3000:]}")
    lists = {}
    for line in (work / "recs.jsonl").read_text().splitlines():
        row = json.loads(line)
        lists[row["user_id"]] = [i if isinstance(i, str) else i["item_id"] for i in row["items"]]
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    info = {"served": manifest["served"]["candidate"], "protocol_note": manifest["holdout"]["note"],
            "train_seconds": round(seconds, 1),
            "train_peak_gib": round(max(peak, before) / 1024 / 1024, 2) if peak > before else None}
    return lists, info


# --- the table ----------------------------------------------------------------------------------------------

def bootstrap(ours: np.ndarray, theirs: np.ndarray, seed: int = 7) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    ratio = float(ours.mean() / theirs.mean()) if theirs.mean() > 0 else float("inf")
    picks = rng.integers(0, len(ours), size=(BOOTSTRAP, len(ours)))
    a, b = ours[picks].mean(axis=1), theirs[picks].mean(axis=1)
    low, high = np.percentile(np.divide(a, b, out=np.full(BOOTSTRAP, np.inf), where=b > 0), [2.5, 97.5])
    return float(low), ratio, float(high)


def run_case(data_dir: Path, events: pd.DataFrame, events_path: Path, split: Split, protocol: str,
             item_category: dict[str, str], work: Path) -> dict[str, object]:
    before = pd.concat([split.train, split.valid])
    again = repeatable_items(before, item_category)
    targets = relevant(before, split.test, again)
    users = sorted(targets)
    blocked = blocked_items(before, again)
    valid_targets = relevant(split.train, split.valid, repeatable_items(split.train, item_category))
    started = time.perf_counter()
    lists, chosen = baselines(split, users, blocked, valid_targets, again)
    baseline_seconds = time.perf_counter() - started
    served, info = run_sharefeed(data_dir, events_path, before, users, protocol, work)
    lists = {"sharefeed": served, **lists}
    per_user = {name: metrics(model_lists, targets, users) for name, model_lists in lists.items()}
    table = {name: {k: float(v.mean()) for k, v in m.items()} for name, m in per_user.items()}
    best = max((n for n in table if n != "sharefeed"), key=lambda n: table[n]["ndcg_at_20"])
    low, ratio, high = bootstrap(per_user["sharefeed"]["ndcg_at_20"], per_user[best]["ndcg_at_20"])
    return {"split": split.name, "protocol": protocol, "users": len(users), "table": table, "best": best,
            "ratio": ratio, "ci": [low, high], "chosen": chosen, "sharefeed": info,
            "baseline_seconds": round(baseline_seconds, 1),
            "per_user": {n: m["ndcg_at_20"].round(6).tolist() for n, m in per_user.items()}}


def pooled(cases: list[dict[str, object]]) -> dict[str, object]:
    """Users of every split seed together: each model's mean, and served / best baseline with its interval."""
    names = list(cases[0]["per_user"])  # type: ignore[call-overload]
    joined = {n: np.concatenate([np.asarray(c["per_user"][n]) for c in cases if n in c["per_user"]])  # type: ignore[index]
              for n in names if all(n in c["per_user"] for c in cases)}  # type: ignore[operator]
    means = {n: float(v.mean()) for n, v in joined.items()}
    best = max((n for n in means if n != "sharefeed"), key=lambda n: means[n])
    low, ratio, high = bootstrap(joined["sharefeed"], joined[best])
    return {"means": means, "best": best, "ratio": ratio, "ci": [low, high], "users": len(joined["sharefeed"])}


def item_categories(data_dir: Path) -> dict[str, str]:
    for name in ("items.csv.gz", "items.csv", "items.parquet"):
        path = data_dir / name
        if path.is_file():
            frame = pd.read_parquet(path) if name.endswith(".parquet") else pd.read_csv(path, dtype=str)
            if "category" in frame.columns:
                return dict(zip(frame["item_id"].astype(str), frame["category"].fillna("").astype(str), strict=True))
    return {}


def evaluate_data(data_dir: Path, seeds: range, protocols: list[str], keep: Path | None,
                  checkpoint: Callable[[dict[str, object]], None] = lambda _: None) -> dict[str, object]:
    """Every case of one data set; `checkpoint` gets the result so far after each split."""
    events, events_path = read_events(data_dir)
    categories = item_categories(data_dir)
    has_order = events["_ts"].nunique() > 1
    result: dict[str, object] = {"data": data_dir.name, "events": len(events), "users": events["user_id"].nunique(),
                                 "items": events["item_id"].nunique(), "cases": {}}
    for protocol in protocols:
        if protocol == "time" and not has_order:
            continue
        splits = [random_split(events, s) for s in seeds] if protocol == "random" else [time_split(events)]
        cases = []
        for split in splits:
            work = Path(tempfile.mkdtemp(prefix=f"quality-{data_dir.name}-"))
            try:
                case = run_case(data_dir, events, events_path, split, protocol, categories, work)
            finally:
                if keep is not None:
                    shutil.copy(work / "train.log", keep / f"{data_dir.name}-{protocol}-{len(cases)}.log")
                shutil.rmtree(work, ignore_errors=True)
            print(f"{data_dir.name} {split.name}: sharefeed ({case['sharefeed']['served']}) / "  # type: ignore[index]
                  f"{case['best']} = {case['ratio']:.3f} [{case['ci'][0]:.3f}, {case['ci'][1]:.3f}], "  # type: ignore[index]
                  f"{case['users']} users", flush=True)
            cases.append(case)
            result["cases"][protocol] = {"splits": cases, "pooled": pooled(cases)}  # type: ignore[index]
            checkpoint(result)
    return result


def markdown(results: list[dict[str, object]]) -> str:
    lines = ["| data | protocol | users | sharefeed serves | sharefeed NDCG@20 | best baseline | its NDCG@20 | "
             "ratio (pooled) | 95% interval | per split seed | train s / peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    detail = []
    for result in results:
        for protocol, case in result["cases"].items():  # type: ignore[attr-defined]
            p = case["pooled"]
            seeds = ", ".join(f"{s['ratio']:.3f}" for s in case["splits"])
            served = ", ".join(sorted({s["sharefeed"]["served"] for s in case["splits"]}))
            cost = ", ".join(f"{s['sharefeed']['train_seconds']:.0f} / {s['sharefeed']['train_peak_gib']}"
                             for s in case["splits"])
            lines.append(f"| {result['data']} | {protocol} | {p['users']:,} | {served} | {p['means']['sharefeed']:.4f} "
                         f"| {p['best']} | {p['means'][p['best']]:.4f} | **{p['ratio']:.3f}** | "
                         f"{p['ci'][0]:.3f} - {p['ci'][1]:.3f} | {seeds} | {cost} |")
            header = ["model", *next(iter(case["splits"][0]["table"].values())).keys()]
            detail.append(f"\n**{result['data']}, {protocol}** (first split: {case['splits'][0]['split']}; "
                          f"baseline choices {case['splits'][0]['chosen']})\n")
            detail.append("| " + " | ".join(header) + " |")
            detail.append("|" + "---|" * len(header))
            for name, row in case["splits"][0]["table"].items():
                detail.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")
    return "\n".join(lines + detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, action="append", default=[])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="split seeds run from this one on")
    parser.add_argument("--protocols", nargs="+", default=["random", "time"], choices=["random", "time"])
    parser.add_argument("--out", type=Path, help="JSON results")
    parser.add_argument("--logs", type=Path, help="keep each run's train log in this folder")
    parser.add_argument("--markdown", type=Path, nargs="+", help="print the tables of these JSON results")
    args = parser.parse_args()
    if args.markdown:
        results = [r for path in args.markdown for r in json.loads(path.read_text())]
        print(markdown(results))
        return
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, object]] = []

    def save(partial: dict[str, object]) -> None:
        if args.out:
            args.out.write_text(json.dumps([*results, partial]))

    for data_dir in args.data:
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        results.append(evaluate_data(data_dir, seeds, args.protocols, args.logs, save))
    print(markdown(results))


if __name__ == "__main__":
    main()
