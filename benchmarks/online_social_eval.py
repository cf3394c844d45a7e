"""What the service gains from seeing friends between two trainings (issue #5), on a `sharefeed demo-data`
folder: the served feed with the online social updates (shares to the user, friends' purchases) against the
served feed from the user's own online events only (what the service read before), same bundle, same
requests, side by side.

A bundle is trained (`sharefeed train`, default parameters unless `--params`) on the events before the last
`--test-days`. The test window's events then reach a real Redis online store in time order, as ingestion
writes them, and at each `--hours`-hour slice start every user the bundle knows who buys in the slice asks
for a feed of 20 twice: with the context the service builds now (`Service.user_view`: the snapshot with the
inbox and the friends' purchases, newer than the bundle) and with the user's own records only. Per
(user, slice): NDCG@20 of the slice's purchases; the ratio with a 95% bootstrap interval over groups; the
groups whose buyer had been sent a bought item before the slice; and the time per request (store read plus
feed) of both, measured in the same loop, as a ratio.

    uv run python benchmarks/online_social_eval.py --data /tmp/d/demo20k --out /tmp/os/online_social.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from social_eval import past_bundle

from features.dataset import load_dataset
from features.online import RedisStore
from features.store import OnlineEvent
from features.weights import CONVERSION_TYPES
from serving.recommender import Recommender, UserContext, new_ties, newer_activity, newer_than, unread
from training.evaluate import bootstrap_ratio
from training.params import TrainParams, load_params
from training.replay import slice_starts

K = 20


def online_events(frame: pd.DataFrame) -> list[OnlineEvent]:
    def named(column: str) -> list[str | None]:
        values = frame[column].tolist() if column in frame.columns else [None] * len(frame)
        return [v if isinstance(v, str) and v else None for v in values]

    return [OnlineEvent(user, item, kind, ts, None, target, referrer)
            for user, item, kind, ts, target, referrer in zip(
                frame["user_id"].tolist(), frame["item_id"].tolist(), frame["event_type"].tolist(),
                (frame["ts"].astype("int64") / 1e9).tolist(), named("target_user_id"), named("referrer_id"),
                strict=True)]


def ndcg(feed: list[str], bought: set[str]) -> float:
    gains = [1.0 / np.log2(rank + 2) for rank, item in enumerate(feed[:K]) if item in bought]
    ideal = sum(1.0 / np.log2(rank + 2) for rank in range(min(len(bought), K)))
    return float(sum(gains) / ideal) if ideal else 0.0


def replay(recommender: Recommender, store: RedisStore, test: pd.DataFrame, cut: pd.Timestamp, end: pd.Timestamp,
           hours: float) -> dict[str, object]:
    """Every slice: the events before its start into the store, then both feeds for its buyers."""
    since = recommender.bundle.state.cutoff_seconds
    scores: dict[str, list[float]] = {"online_social": [], "own_only": []}
    seconds: dict[str, float] = {"online_social": 0.0, "own_only": 0.0}
    shared_groups: list[bool] = []
    recorded = 0
    buys = test.loc[test["event_type"].isin(CONVERSION_TYPES)]
    times = test["ts"].astype("int64").to_numpy()
    for start in slice_starts(cut, end, hours):
        stop = start + pd.Timedelta(hours=hours)
        upto = int(np.searchsorted(times, start.value, side="left"))
        if upto > recorded:
            store.record(online_events(test.iloc[recorded:upto]))
            recorded = upto
        bought = buys.loc[(buys["ts"] >= start) & (buys["ts"] < stop)]
        for user, items in bought.groupby("user_id")["item_id"]:
            if str(user) not in recommender.bundle.users:
                continue
            targets = set(items.astype(str))
            started = time.perf_counter()
            friends = recommender.friend_ids(str(user))
            snapshot = store.snapshot(str(user), friends)
            shared, friends_bought = newer_than(snapshot.shared_to, snapshot.friends_purchased, since)
            friends_shared = newer_activity(snapshot.friends_shared, since)
            referred = {r: ts for r, ts in snapshot.referred_by.items() if ts >= since}
            if ties := unread(new_ties(shared, referred, since), friends, recommender.bundle.users):
                ties_bought, ties_shared = store.activity_of(ties)  # ties since the bundle
                friends_bought |= newer_activity(ties_bought, since)
                friends_shared |= newer_activity(ties_shared, since)
            context = UserContext(snapshot.recent, snapshot.purchased, shared, friends_bought, referred,
                                  friends_shared)
            now = start.to_pydatetime()  # the request's clock: the slice start
            feed = [i.item_id for i in recommender.feed(str(user), K, context=context, now=now).items]
            seconds["online_social"] += time.perf_counter() - started
            started = time.perf_counter()
            own = store.snapshot(str(user))
            plain = [i.item_id for i in recommender.feed(str(user), K, context=UserContext(own.recent, own.purchased),
                                                         now=now).items]
            seconds["own_only"] += time.perf_counter() - started
            scores["online_social"].append(ndcg(feed, targets))
            scores["own_only"].append(ndcg(plain, targets))
            shared_groups.append(bool({e.item_id for e in shared} & targets))
    ours, theirs = np.asarray(scores["online_social"]), np.asarray(scores["own_only"])
    low, mid, high = bootstrap_ratio(ours, theirs, np.random.default_rng(31))
    with_share = np.asarray(shared_groups, dtype=bool)
    groups = len(ours)
    return {
        "groups": groups, "ndcg_online_social": float(ours.mean()), "ndcg_own_only": float(theirs.mean()),
        "ratio": mid, "ci_low": low, "ci_high": high,
        "groups_with_a_shared_target": int(with_share.sum()),
        "ndcg_shared_groups_online_social": float(ours[with_share].mean()) if with_share.any() else None,
        "ndcg_shared_groups_own_only": float(theirs[with_share].mean()) if with_share.any() else None,
        "ms_per_request_online_social": 1000 * seconds["online_social"] / max(groups, 1),
        "ms_per_request_own_only": 1000 * seconds["own_only"] / max(groups, 1),
        "time_ratio": seconds["online_social"] / max(seconds["own_only"], 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=None, help="training parameters (YAML); default ones if not")
    parser.add_argument("--test-days", type=float, default=3.0)
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    params = load_params(args.params) if args.params else TrainParams()
    data = load_dataset(args.data, params.weights.keys())
    events = data.events.sort_values("ts", kind="stable").reset_index(drop=True)
    end = events["ts"].max() + pd.Timedelta(seconds=1)
    cut = (end - pd.Timedelta(days=args.test_days)).floor("D")
    tables = {"items": data.items, "users": data.users, "social": data.social}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        _, recommender = past_bundle(events, tables, cut, Path(workdir), params)
    train_seconds = time.perf_counter() - started
    store = RedisStore(args.redis_url, prefix=f"bench:{uuid.uuid4().hex[:8]}:")
    try:
        result = replay(recommender, store, events.loc[events["ts"] >= cut].reset_index(drop=True), cut, end,
                        args.hours)
    finally:
        for key in store.client.scan_iter(match=f"{store.keys.prefix}*"):
            store.client.delete(key)
        store.close()
    result |= {"data": str(args.data), "cut": str(cut), "end": str(end), "hours": args.hours,
               "train_seconds": train_seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
