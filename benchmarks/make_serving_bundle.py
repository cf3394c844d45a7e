"""Rewrite a trained bundle with another FAISS item index (HNSW M / efConstruction / efSearch, or flat).

`sharefeed train` builds the index from the `index` section of its parameters; re-training a 1M-user
bundle only to try another index setting costs most of an hour on 2 cores. This script loads a bundle
(`training.bundle.load_bundle`, checksums verified), builds the index over the same item factors with
`training.index.build_item_index`, and writes a new bundle with `training.bundle.write_bundle` (new
checksums, new bundle version, the manifest's `model.index_kind` / `model.ef_search` updated). Everything
else is carried over unchanged. Usage:

    uv run python benchmarks/make_serving_bundle.py --bundle /tmp/serveload/bundle1m \
        --out /tmp/serveload/bundle1m-m48 --kind hnsw --hnsw-m 48 --ef-construction 200 --ef-search 256
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

from training.bundle import BundleContents, load_bundle, write_bundle
from training.index import build_item_index, index_kind
from training.params import IndexParams


def rebuild_index(bundle_path: Path, out: Path, params: IndexParams) -> str:
    bundle = load_bundle(bundle_path)
    started = time.perf_counter()
    index = build_item_index(bundle.item_factors, params)
    print(f"index built in {time.perf_counter() - started:.1f}s")
    contents = BundleContents(**{f.name: (index if f.name == "index" else getattr(bundle, f.name))
                                 for f in fields(BundleContents)})
    model = bundle.manifest.model.model_copy(update={"index_kind": index_kind(len(bundle.items), params),
                                                     "ef_search": params.ef_search})
    manifest = write_bundle(out, contents, bundle.manifest.model_copy(update={"model": model}))
    return manifest.bundle_version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kind", choices=["auto", "flat", "hnsw"], default="hnsw")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, default=128)
    args = parser.parse_args()
    params = IndexParams(kind=args.kind, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                         ef_search=args.ef_search)
    version = rebuild_index(args.bundle, args.out, params)
    print(f"bundle {version} written to {args.out}")


if __name__ == "__main__":
    main()
