"""FAISS indexes over item vectors, built at training time and shipped in the bundle.

Retrieval for a user is maximum inner product over the ALS item factors: exact (flat) for catalogs small
enough to be fast anyway, HNSW above that, with the efSearch to use stored on the index.
"""

from __future__ import annotations

import faiss
import numpy as np

from training.params import IndexParams


def index_kind(n_items: int, params: IndexParams) -> str:
    if params.kind != "auto":
        return params.kind
    return "flat" if n_items <= params.flat_max_items else "hnsw"


def build_item_index(item_factors: np.ndarray, params: IndexParams) -> faiss.Index:
    """An inner-product index whose ids are the item indexes."""
    vectors = np.ascontiguousarray(item_factors, dtype=np.float32)
    dim = vectors.shape[1]
    index: faiss.Index
    if index_kind(len(vectors), params) == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        hnsw = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = params.ef_construction
        hnsw.hnsw.efSearch = params.ef_search
        index = hnsw
    index.add(vectors)
    return index
