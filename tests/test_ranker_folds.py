"""Picking the ranker's round count by cross-validation over training groups (`ranker.stopping_folds`)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from features.ranking import FEATURE_NAMES
from training.params import RankerParams
from training.ranker import RankerData, fit_ranker

WEIGHTS = np.linspace(1.0, 0.3, 8)


def _learned(scores: np.ndarray, data: RankerData) -> float:
    """How closely the scores follow what set the labels."""
    return float(np.corrcoef(scores, data.features[:, :8] @ WEIGHTS)[0, 1])


def _groups(seed: int, groups: int = 60, size: int = 12, signal: bool = True) -> RankerData:
    """Labels (graded 0, 1, 2) follow a sum over the first eight columns, which takes many small trees to learn,
    or are drawn at random when `signal` is off."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(groups * size, len(FEATURE_NAMES))).astype(np.float32)
    driver = features[:, :8] @ WEIGHTS if signal else rng.normal(size=len(features))
    labels = np.digitize(driver + rng.normal(scale=0.5, size=len(features)), [1.0, 2.5]).astype(np.int32)
    return RankerData(features, labels, np.full(groups, size, dtype=np.int64))


def _params(**update: object) -> RankerParams:
    base = {"min_data_in_leaf": 5, "num_leaves": 4, "max_rounds": 150, "early_stopping_rounds": 15}
    return RankerParams.model_validate(base | update)


def test_folds_ignore_the_validation_users_and_learn_the_signal() -> None:
    train = _groups(seed=1)
    noise = _groups(seed=2, signal=False)  # validation users whose labels say nothing
    on_noise = fit_ranker(train, _params(), noise)
    by_folds = fit_ranker(train, _params(stopping_folds=4), noise)
    assert by_folds.rounds == fit_ranker(train, _params(stopping_folds=4)).rounds  # the validation set is not read
    assert by_folds.rounds > on_noise.rounds  # a noisy validation curve stopped the other one early

    test = _groups(seed=3)
    assert _learned(by_folds.predict(test.features), test) > 0.8


def test_more_rounds_where_there_is_something_to_learn() -> None:
    learnable = fit_ranker(_groups(seed=4), _params(stopping_folds=5)).rounds
    noise = fit_ranker(_groups(seed=4, signal=False), _params(stopping_folds=5)).rounds
    assert learnable > noise
    assert fit_ranker(_groups(seed=4), _params(stopping_folds=5)).rounds == learnable  # deterministic per seed


@pytest.mark.parametrize("objective", ["binary", "rank_xendcg"])
def test_other_objectives_cross_validate_by_whole_group(objective: str) -> None:
    ranker = fit_ranker(_groups(seed=5), _params(objective=objective, stopping_folds=3))
    assert 1 <= ranker.rounds <= 150
    test = _groups(seed=6)
    assert _learned(ranker.predict(test.features), test) > 0.8


def test_a_given_round_count_wins_over_the_folds() -> None:
    assert fit_ranker(_groups(seed=7), _params(stopping_folds=5), rounds=9).rounds == 9


def test_too_few_groups_or_one_fold_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot be split into 5 folds"):
        fit_ranker(_groups(seed=8, groups=3), _params(stopping_folds=5))
    with pytest.raises(ValidationError, match="stopping_folds"):
        RankerParams(stopping_folds=1)
    assert RankerParams().stopping_folds == 0
