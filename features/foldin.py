"""Fold-in: the ALS vector of a user from their interactions, with the item factors held fixed.

The same least-squares step ALS takes for every user during fitting, solved for one user at request
time: minimise sum_i c_i (p_i - x.y_i)^2 + reg |x|^2 over all items, where c_i = alpha * confidence for
the items the user touched (p_i = 1) and 1 elsewhere (p_i = 0). With the Gram matrix Y^T Y kept in the
bundle this costs a factors x factors solve, and serving needs nothing from the fitting library.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class FoldIn:
    item_factors: np.ndarray  # items x factors, float32
    item_gram: np.ndarray  # factors x factors: item_factors.T @ item_factors
    regularization: float
    alpha: float
    confidence_scale: str  # "linear" or "log", as the model was fitted

    def confidence(self, weights: np.ndarray) -> np.ndarray:
        """Summed event weights -> the confidences ALS saw (scaled, then times alpha)."""
        positive = np.maximum(weights.astype(np.float64), 0.0)
        if self.confidence_scale == "log":
            positive = np.log1p(positive)
        elif self.confidence_scale != "linear":
            raise ValueError(f"unknown confidence scale: {self.confidence_scale!r}")
        return self.alpha * positive

    def user_vector(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        """The user's factor vector from summed weights per item; None when no weight is positive."""
        confidence = self.confidence(weights)
        keep = confidence > 0
        if not keep.any():
            return None
        factors = self.item_factors[items[keep]].astype(np.float64)
        c = confidence[keep]
        k = self.item_gram.shape[0]
        a = self.item_gram.astype(np.float64) + self.regularization * np.eye(k)
        a += (factors * (c - 1.0)[:, None]).T @ factors
        b = factors.T @ c
        vector: np.ndarray = np.linalg.solve(a, b).astype(np.float32)
        return vector
