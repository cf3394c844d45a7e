"""ALS on an analytic fixture: two groups of users with disjoint tastes and a withheld item each."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from training.als import fit_als
from training.params import ALSParams


def _two_clusters(n_users: int = 40, items_per_cluster: int = 8) -> tuple[sp.csr_matrix, list[int]]:
    """Users 0..n/2 buy items 0..k-1, the others items k..2k-1; each user misses one item of their group."""
    rows, cols, withheld = [], [], []
    half = n_users // 2
    for user in range(n_users):
        base = 0 if user < half else items_per_cluster
        missing = base + user % items_per_cluster
        withheld.append(missing)
        for item in range(base, base + items_per_cluster):
            if item != missing:
                rows.append(user)
                cols.append(item)
    matrix = sp.csr_matrix((np.full(len(rows), 5.0, dtype=np.float32), (rows, cols)),
                           shape=(n_users, 2 * items_per_cluster))
    return matrix, withheld


def test_als_ranks_the_withheld_item_of_the_users_own_group_first() -> None:
    matrix, withheld = _two_clusters()
    factors = fit_als(matrix, ALSParams(factors=2, iterations=20, regularization=0.1, alpha=5.0))
    assert factors.user_factors.shape == (40, 2)
    assert factors.item_factors.shape == (16, 2)
    scores = factors.user_factors @ factors.item_factors.T
    seen = matrix.toarray() > 0
    scores[seen] = -np.inf
    assert (scores.argmax(axis=1) == np.asarray(withheld)).all()


def test_item_gram_is_the_factor_product() -> None:
    matrix, _ = _two_clusters()
    factors = fit_als(matrix, ALSParams(factors=4, iterations=3))
    np.testing.assert_allclose(factors.item_gram(), factors.item_factors.T @ factors.item_factors, rtol=1e-5)
