"""The ranker's objective is the one the parameters ask for."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from features.ranking import FEATURE_NAMES
from training.params import RankerParams
from training.ranker import Ranker, RankerData, fit_ranker


def _groups(seed: int = 5, groups: int = 40, size: int = 12) -> RankerData:
    """Groups whose label follows the first column: graded 0, 1, 2 as purchase data gives them."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(groups * size, len(FEATURE_NAMES))).astype(np.float32)
    labels = np.digitize(features[:, 0], [0.5, 1.2]).astype(np.int32)
    return RankerData(features, labels, np.full(groups, size, dtype=np.int64))


@pytest.mark.parametrize("objective", ["lambdarank", "rank_xendcg", "binary"])
def test_the_model_is_fitted_with_the_chosen_objective(objective: str) -> None:
    params = RankerParams(objective=objective, min_data_in_leaf=5, num_leaves=4, max_rounds=20)  # type: ignore[arg-type]
    ranker = fit_ranker(_groups(), params, _groups(seed=6))

    lines = ranker.to_string().splitlines()
    assert any(line.split()[0] == f"objective={objective}" for line in lines if line.startswith("objective="))
    again = Ranker.from_string(ranker.to_string())
    test = _groups(seed=7)
    scores = again.predict(test.features)
    assert np.corrcoef(scores, test.features[:, 0])[0, 1] > 0.5  # it learned the column that sets the label


def test_lambdarank_stays_the_default() -> None:
    assert RankerParams().objective == "lambdarank"
    with pytest.raises(ValidationError, match="objective"):
        RankerParams(objective="regression")  # type: ignore[arg-type]
