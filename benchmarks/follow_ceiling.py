"""How much a data set's follow / friend graph could tell about its test purchases (issue #5).

Splits at the holdout cut `sharefeed train` picks, then counts the test purchases of an item that one of
the buyer's followees (the `social` table's friend_id for the buyer's user_id) bought before the cut, and
scores one plain social ranking: each test user's followees' past purchases (not bought by the user),
most followees first, then the most bought items overall; top 20 against the test purchases.

    uv run python benchmarks/follow_ceiling.py --data ../shared/data/epinions
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from features.dataset import load_dataset
from training.params import TrainParams
from training.split import time_holdout

K = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    params = TrainParams()
    data = load_dataset(args.data, params.weights.keys())
    if data.social is None:
        raise SystemExit(f"{args.data} has no social table")
    events = data.events.sort_values("ts")
    holdout = time_holdout(events, params.split)
    bought = holdout.train.loc[holdout.train["event_type"] == "purchase", ["user_id", "item_id"]]
    test = holdout.test.loc[holdout.test["event_type"] == "purchase", ["user_id", "item_id"]].drop_duplicates()
    followees = data.social[["user_id", "friend_id"]].drop_duplicates()

    by_followee = followees.merge(bought.rename(columns={"user_id": "friend_id"}), on="friend_id")
    counts = by_followee.groupby(["user_id", "item_id"]).size().rename("followees").reset_index()
    reachable = test.merge(counts[["user_id", "item_id"]], on=["user_id", "item_id"])
    print(f"{holdout.note}; {len(test):,} distinct test purchases by {test['user_id'].nunique():,} users")
    print(f"bought by a followee before the cut: {len(reachable):,} ({len(reachable) / max(len(test), 1):.1%}) "
          f"on {reachable['user_id'].nunique():,} users")

    own = set(zip(bought["user_id"], bought["item_id"], strict=True))
    counts = counts.loc[[(u, i) not in own for u, i in zip(counts["user_id"], counts["item_id"], strict=True)]]
    counts = counts.loc[counts["user_id"].isin(set(test["user_id"]))]
    counts = counts.assign(popularity=counts["item_id"].map(bought["item_id"].value_counts()).fillna(0))
    counts = counts.sort_values(["user_id", "followees", "popularity"], ascending=[True, False, False])
    top = counts.loc[counts.groupby("user_id").cumcount() < K]
    truth = test.groupby("user_id")["item_id"].agg(set)
    ndcg, hit_users = [], 0
    for user, items in top.groupby("user_id")["item_id"]:
        relevant = np.asarray([item in truth[user] for item in items], dtype=float)
        discounts = 1.0 / np.log2(np.arange(2, K + 2))
        ideal = discounts[: min(len(truth[user]), K)].sum()
        ndcg.append(float((relevant * discounts[: len(relevant)]).sum() / ideal))
        hit_users += bool(relevant.any())
    users = len(truth)
    print(f"followees' purchases, top {K}: {top['user_id'].nunique():,} users get a list, {hit_users:,} get a hit; "
          f"NDCG@{K} over all {users:,} test users {sum(ndcg) / max(users, 1):.4f}")


if __name__ == "__main__":
    main()
