"""Fold-in in the service matches the fitting library's own recalculation of a user."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from features.foldin import FoldIn


@pytest.mark.parametrize("scale", ["linear", "log"])
def test_fold_in_matches_implicit_recalculate_user(scale: str) -> None:
    from implicit.cpu.als import AlternatingLeastSquares

    rng = np.random.default_rng(5)
    dense = rng.random((60, 40)) * (rng.random((60, 40)) < 0.15) * 6.0
    matrix = sp.csr_matrix(dense.astype(np.float32))
    confidence = matrix.copy()
    if scale == "log":
        confidence.data = np.log1p(confidence.data).astype(np.float32)
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=8, regularization=0.3, alpha=4.0, iterations=5, random_state=1)
        model.fit(confidence, show_progress=False)
        fold = FoldIn(np.asarray(model.item_factors), np.asarray(model.item_factors).T @ model.item_factors,
                      regularization=0.3, alpha=4.0, confidence_scale=scale)
        for user in (0, 7, 33):
            expected = model.recalculate_user(user, confidence[user])
            got = fold.user_vector(matrix[user].indices, matrix[user].data)
            assert got is not None
            np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-4)


def test_fold_in_of_nothing_is_none() -> None:
    fold = FoldIn(np.ones((3, 2), np.float32), np.eye(2, dtype=np.float32), 0.1, 1.0, "linear")
    assert fold.user_vector(np.array([0, 1]), np.array([0.0, -5.0])) is None


def test_items_touched_score_higher_after_fold_in() -> None:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(50, 6)).astype(np.float32)
    fold = FoldIn(items, items.T @ items, 0.1, 10.0, "linear")
    vector = fold.user_vector(np.array([3, 4, 5]), np.array([5.0, 1.0, 1.0]))
    assert vector is not None
    scores = items @ vector
    assert set(np.argsort(-scores)[:6].tolist()) & {3, 4, 5}
