"""The item-to-item sources: EASE solved either way round agrees with the textbook inverse, pruning keeps
each row's strongest weights, and the lambda search shrinks with the catalog."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from training.sources import EASE_LAMBDAS, EaseSystem, ease_lambdas, fit_bm25, pruned


def _textbook(x: np.ndarray, lam: float, dropout: float) -> np.ndarray:
    gram = x.T @ x
    p = np.linalg.inv(gram + np.diag(lam + dropout / (1 - dropout) * np.diag(gram)))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


@pytest.mark.parametrize("users", [12, 60])  # fewer users than items (Woodbury), and more
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_ease_matches_the_textbook_inverse(users: int, dropout: float) -> None:
    rng = np.random.default_rng(users)
    x = (rng.random((users, 30)) < 0.2).astype(np.float64)
    system = EaseSystem(sp.csr_matrix(x * 3.0))  # values are binarized: EASE reads presence only
    assert system.wide == (users < 30)
    np.testing.assert_allclose(system.weights(20.0, dropout), _textbook(x, 20.0, dropout), atol=1e-4)


def test_pruning_keeps_the_strongest_weights_of_each_row() -> None:
    dense = np.asarray([[0.0, 0.5, -0.9, 0.1], [0.2, 0.0, 0.3, -0.1], [1.0, 1.0, 0.0, 0.0], [0, 0, 0, 0.0]])
    kept = pruned(dense, keep=2).weights.toarray()
    np.testing.assert_allclose(kept, [[0, 0.5, -0.9, 0], [0.2, 0, 0.3, 0], [1, 1, 0, 0], [0, 0, 0, 0]], atol=1e-7)


def test_the_lambda_search_shrinks_with_the_inversion_cost() -> None:
    assert ease_lambdas(50_000, 3_000) == EASE_LAMBDAS
    assert ease_lambdas(500, 15_000) == EASE_LAMBDAS  # few users: the users x users system is small
    big = ease_lambdas(50_000, 10_000)
    assert 1 <= len(big) < len(EASE_LAMBDAS)
    assert set(big) <= set(EASE_LAMBDAS)
    assert ease_lambdas(50_000, 25_000) == ()


def test_bm25_neighbours_link_items_bought_together() -> None:
    x = sp.csr_matrix(np.asarray([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=np.float32))
    weights = fit_bm25(x).weights.toarray()
    assert weights[0, 1] > 0
    assert weights[0, 2] == 0
