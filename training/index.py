"""FAISS indexes over item vectors, built at training time and shipped in the bundle.

Retrieval for a user is maximum inner product over the item factors. `flat` is exact. `pq` scans 4-bit
product codes of every item (one code per dimension, SIMD "fast scan": about a fifth of a flat scan's
time on 100k items) and re-scores its best `refine_factor * k` with the exact vectors, so the scores it
returns are exact and recall@200 against flat search stays near 1 (docs/benchmarks.md). `hnsw` (a graph
over inner product) is kept for comparison: on ALS factors its recall@200 stays under 0.95 at any usable
efSearch, because part of the catalog is unreachable in an inner-product graph.
"""

from __future__ import annotations

import faiss
import numpy as np

from training.params import IndexParams


def index_kind(n_items: int, params: IndexParams) -> str:
    if params.kind != "auto":
        return params.kind
    return "flat" if n_items <= params.flat_max_items else "pq"


def build_item_index(item_factors: np.ndarray, params: IndexParams) -> faiss.Index:
    """An inner-product index whose ids are the item indexes."""
    vectors = np.ascontiguousarray(item_factors, dtype=np.float32)
    dim = vectors.shape[1]
    index: faiss.Index
    kind = index_kind(len(vectors), params)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "pq":
        codes = faiss.IndexPQFastScan(dim, dim, 4, faiss.METRIC_INNER_PRODUCT)  # one 4-bit code per dimension
        refined = faiss.IndexRefineFlat(codes)
        refined.k_factor = params.refine_factor
        refined.train(vectors)
        index = refined
    else:
        hnsw = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = params.ef_construction
        hnsw.hnsw.efSearch = params.ef_search
        index = hnsw
    index.add(vectors)
    return index


def index_like(index: faiss.Index, item_factors: np.ndarray) -> faiss.Index:
    """An index of the same kind as `index` over other vectors (the BPR items beside the ALS index);
    "pq" for an HNSW index, whose graph would take minutes to build when a bundle is loaded."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexFlat):
        return build_item_index(item_factors, IndexParams(kind="flat"))
    factor = float(inner.k_factor) if isinstance(inner, faiss.IndexRefine) else IndexParams().refine_factor
    return build_item_index(item_factors, IndexParams(kind="pq", refine_factor=factor))
