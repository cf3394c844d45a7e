"""Fitting implicit-feedback ALS: the collaborative-filtering candidate model.

The only module that imports `implicit`. It returns plain factor arrays (users x factors, items x
factors) so the bundle, evaluation and serving need nothing from the library.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from features.interactions import scale_confidence
from training.params import ALSParams


@dataclass(frozen=True, slots=True)
class Factors:
    user_factors: np.ndarray  # float32, users x factors
    item_factors: np.ndarray  # float32, items x factors
    regularization: float
    alpha: float

    def item_gram(self) -> np.ndarray:
        """Y^T Y: with the item factors it is all fold-in of a new user needs."""
        gram: np.ndarray = (self.item_factors.T @ self.item_factors).astype(np.float32)
        return gram


def fit_als(user_items: sp.csr_matrix, params: ALSParams, *, show_progress: bool = False) -> Factors:
    """Fit ALS on a users x items matrix of summed event weights."""
    from implicit.cpu.als import AlternatingLeastSquares

    confidence = scale_confidence(user_items, params.confidence_scale).tocsr().astype(np.float32)
    # The FAISS wheel's OpenBLAS ignores OPENBLAS_NUM_THREADS; ALS runs its own threads, so BLAS gets one
    # (implicit checks this when the model is built, hence the model is built inside the limit too).
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            random_state=params.seed,
        )
        model.fit(confidence, show_progress=show_progress)
    users = np.ascontiguousarray(model.user_factors, dtype=np.float32)
    items = np.ascontiguousarray(model.item_factors, dtype=np.float32)
    n_users, n_items = user_items.shape
    if users.shape != (n_users, params.factors) or items.shape != (n_items, params.factors):
        raise RuntimeError(
            f"ALS factor shapes {users.shape} / {items.shape} do not match the {n_users} x {n_items} matrix"
        )
    return Factors(users, items, params.regularization, params.alpha)
