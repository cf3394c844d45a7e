"""Batch feeds: `sharefeed recommend` writes one JSON line per requested user, best item first.

It answers through the same `Recommender.feed` as the HTTP service, so both agree for a user who has not
acted since training; every requested user gets a line (unknown users get the fallback chain), and a user
who withheld personalization or was erased gets the non-personal feed, as the service gives them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pandas as pd

from serving.privacy import Privacy
from serving.recommender import Recommender

_CHUNK = 1000  # users whose consent is read at a time


def read_user_ids(path: Path) -> list[str]:
    """User ids from a text file (one per line) or a CSV/Parquet/JSON Lines file with a `user_id` column."""
    name = path.name
    if name.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path, dtype=str, keep_default_na=False)["user_id"].tolist()
    if name.endswith(".parquet"):
        return pd.read_parquet(path)["user_id"].astype(str).tolist()
    if name.endswith((".jsonl", ".ndjson")):
        return [str(orjson.loads(line)["user_id"]) for line in path.read_bytes().splitlines() if line.strip()]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def recommend_lines(recommender: Recommender, user_ids: list[str], n: int, privacy: Privacy) -> Iterator[bytes]:
    for start in range(0, len(user_ids), _CHUNK):
        chunk = user_ids[start:start + _CHUNK]
        for user_id, allowed in zip(chunk, privacy.allowed(chunk, ["personalization"]), strict=True):
            result = recommender.feed(user_id, n, personalized=allowed)
            yield orjson.dumps({"user_id": user_id, "items": [i.item_id for i in result.items]}) + b"\n"


def write_recommendations(recommender: Recommender, user_ids: list[str], n: int, out: Path,
                          privacy: Privacy) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out.open("wb") as fh:
        for line in recommend_lines(recommender, user_ids, n, privacy):
            fh.write(line)
            written += 1
    return written
