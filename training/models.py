"""Fitting the candidate models of one time window: ALS, BPR and item-item neighbours.

The only module besides `training.als` that imports `implicit`; it returns `CandidateModels`, plain
arrays that `features.candidates` scores with.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from features.candidates import CandidateModels
from features.interactions import scale_confidence
from training.als import fit_als
from training.params import TrainParams


def fit_bpr(user_items: sp.csr_matrix, params: TrainParams) -> tuple[np.ndarray, np.ndarray]:
    """BPR factors (users x f+1, items x f+1: implicit appends the item bias column)."""
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    binary = user_items.copy().tocsr()
    binary.data = np.ones_like(binary.data)  # BPR ignores values: only positive cells, never negatives
    binary.eliminate_zeros()
    with threadpool_limits(1, "blas"):
        model = BayesianPersonalizedRanking(
            factors=params.bpr.factors,
            learning_rate=params.bpr.learning_rate,
            regularization=params.bpr.regularization,
            iterations=params.bpr.iterations,
            random_state=params.bpr.seed,
            num_threads=1,  # its SGD is lock-free across threads: one thread keeps a refit reproducible
        )
        model.fit(binary, show_progress=False)
    users = np.ascontiguousarray(model.user_factors, dtype=np.float32)
    items = np.ascontiguousarray(model.item_factors, dtype=np.float32)
    if users.shape[0] != user_items.shape[0] or items.shape[0] != user_items.shape[1]:
        raise RuntimeError(f"BPR factor shapes {users.shape} / {items.shape} do not match {user_items.shape}")
    return users, items


def fit_neighbours(user_items: sp.csr_matrix, params: TrainParams) -> sp.csr_matrix:
    """Cosine similarity between items over the users who touched them, top neighbours per item."""
    from implicit.nearest_neighbours import ItemItemRecommender

    # Cosine = item-item dot products of unit-length item columns. Normalising here (rather than through
    # implicit's CosineRecommender, which hands a COO matrix to its own fit) keeps the input CSR.
    weighted = scale_confidence(user_items, params.als.confidence_scale).tocsr()
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=0)).ravel())
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    unit = sp.csr_matrix(weighted.astype(np.float64) @ sp.diags(scale))
    model = ItemItemRecommender(K=params.neighbours.neighbours)
    with threadpool_limits(1, "blas"):
        model.fit(unit, show_progress=False)
    similarity = sp.csr_matrix(model.similarity, dtype=np.float32)
    similarity.setdiag(0.0)  # an item is not its own neighbour
    similarity.eliminate_zeros()
    return similarity


def fit_candidate_models(user_items: sp.csr_matrix, params: TrainParams) -> CandidateModels:
    als = fit_als(user_items, params.als)
    bpr_users, bpr_items = fit_bpr(user_items, params)
    return CandidateModels(
        als_users=als.user_factors,
        als_items=als.item_factors,
        bpr_users=bpr_users,
        bpr_items=bpr_items,
        item_neighbours=fit_neighbours(user_items, params),
    )
