"""Serving bundles for the load benchmark (issue #4) when `sharefeed train` as is costs too much.

Two commands, both built on the library's own functions (no training logic is copied here):

`index`: rewrite a trained bundle with another FAISS item index. `training.bundle.load_bundle` (checksums
verified), `training.index.build_item_index` over the same item factors, `training.bundle.write_bundle`
(new checksums and bundle version; the manifest's `model.index_kind` / `model.ef_search` updated).
Everything else is carried over unchanged.

    uv run python benchmarks/make_serving_bundle.py index --bundle /tmp/serveload/bundle1m \
        --out /tmp/serveload/bundle1m-pq --kind pq --refine-factor 4

`train`: `training.pipeline.train` itself, with the two-stage evaluation's per-user work cut to a stable
sample of users. On 1M users the evaluation builds candidate rows (a Python loop, ~5-10 ms per user)
for every user with a label in the ranker window and every test user (60k-90k each), which costs most of
an hour on 2 cores and a feature matrix of several GB. Here the label users of the ranker windows and the
holdout's test users are restricted to those whose id hashes into `--user-share`; the candidate models,
the feature state, the refit on all data, the index and the bundle are exactly what `train` writes (the
ranker learns from fewer groups, and the holdout table is measured on the sample: both noted in the
manifest's holdout note).

    uv run python benchmarks/make_serving_bundle.py train --data /tmp/serveload/data1m \
        --out /tmp/serveload/bundle1m --params benchmarks/params/serve-load.yaml --user-share 0.2
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from training.bundle import BundleContents, load_bundle, write_bundle
from training.index import build_item_index, index_kind
from training.params import IndexParams, load_params


def rebuild_index(bundle_path: Path, out: Path, params: IndexParams) -> str:
    bundle = load_bundle(bundle_path)
    started = time.perf_counter()
    index = build_item_index(bundle.item_factors, params)
    print(f"index built in {time.perf_counter() - started:.1f}s")
    contents = BundleContents(**{f.name: (index if f.name == "index" else getattr(bundle, f.name))
                                 for f in dataclasses.fields(BundleContents)})
    model = bundle.manifest.model.model_copy(update={"index_kind": index_kind(len(bundle.items), params),
                                                     "ef_search": params.ef_search})
    manifest = write_bundle(out, contents, bundle.manifest.model_copy(update={"model": model}))
    return manifest.bundle_version


def _sampled(user_ids: pd.Series, share: float) -> np.ndarray:
    """A stable sample of users: the same ids are kept in every window and every run."""
    hashed = pd.util.hash_pandas_object(user_ids.astype("str"), index=False).to_numpy()
    return np.asarray(hashed % 10_000 < int(share * 10_000))


def train_sampled(data: Path, out: Path, params_path: Path | None, share: float) -> None:
    from training import pipeline, twostage
    from training.settings import TrainingSettings

    holdout_fn, labels_fn = pipeline.time_holdout, twostage.labels_between

    def sampled_holdout(events: pd.DataFrame, split: object) -> object:
        holdout = holdout_fn(events, split)  # type: ignore[arg-type]
        test = holdout.test.loc[_sampled(holdout.test["user_id"], share)]
        note = f"{holdout.note}; test users sampled to {share:.0%} (benchmarks/make_serving_bundle.py)"
        return dataclasses.replace(holdout, test=test, note=note)

    def sampled_labels(events: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp | None) -> pd.DataFrame:
        labels = labels_fn(events, start, end)
        return labels.loc[_sampled(labels["user_id"], share)]

    pipeline.time_holdout = sampled_holdout  # type: ignore[assignment]
    twostage.labels_between = sampled_labels  # type: ignore[assignment]
    result = pipeline.train(data, out, load_params(params_path), TrainingSettings())
    print("stage seconds:", {k: round(v, 1) for k, v in result.stage_seconds.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="rewrite a bundle with another FAISS index")
    index.add_argument("--bundle", type=Path, required=True)
    index.add_argument("--out", type=Path, required=True)
    index.add_argument("--kind", choices=["auto", "flat", "pq", "hnsw"], default="pq")
    index.add_argument("--refine-factor", type=float, default=4.0, help="pq: exact re-scoring of refine x k items")
    index.add_argument("--hnsw-m", type=int, default=32)
    index.add_argument("--ef-construction", type=int, default=80)
    index.add_argument("--ef-search", type=int, default=128)
    train = commands.add_parser("train", help="sharefeed train with the evaluation's users sampled")
    train.add_argument("--data", type=Path, required=True)
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--params", type=Path, default=None)
    train.add_argument("--user-share", type=float, default=0.2)
    args = parser.parse_args()
    if args.command == "index":
        params = IndexParams(kind=args.kind, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                             ef_search=args.ef_search, refine_factor=args.refine_factor)
        version = rebuild_index(args.bundle, args.out, params)
        print(f"bundle {version} written to {args.out}")
    else:
        train_sampled(args.data, args.out, args.params, args.user_share)


if __name__ == "__main__":
    main()
