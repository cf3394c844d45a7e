"""Training parameters: what to fit. A YAML file parsed into a strict model, hashed into the bundle.

Deployment settings (where MLflow is, which directory) are not here: see `training.settings`.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from features.weights import merged_weights


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ALSParams(_Strict):
    factors: int = Field(64, ge=2, le=1024)
    regularization: float = Field(0.05, ge=0.0)
    alpha: float = Field(10.0, gt=0.0)  # confidence = 1 + alpha * scaled weight
    iterations: int = Field(15, ge=1, le=200)
    confidence_scale: Literal["linear", "log"] = "log"
    recency_half_life_days: float | None = Field(None, gt=0.0)  # decay event weights with age; None: off
    seed: int = 13


class BPRParams(_Strict):
    factors: int = Field(64, ge=2, le=1024)
    learning_rate: float = Field(0.05, gt=0.0)
    regularization: float = Field(0.01, ge=0.0)
    iterations: int = Field(60, ge=1, le=1000)
    seed: int = 17


class NeighbourParams(_Strict):
    neighbours: int = Field(50, ge=1, le=1000)  # similar items kept per item (cosine over co-interactions)


class CandidateParams(_Strict):
    """How many items each source proposes per user before ranking."""

    als: int = Field(100, ge=0)
    bpr: int = Field(50, ge=0)
    item_knn: int = Field(100, ge=0)
    repeat: int = Field(50, ge=0)
    category_trending: int = Field(30, ge=0)
    new_arrivals: int = Field(20, ge=0)
    trending: int = Field(30, ge=0)
    shared: int = Field(30, ge=0)  # items shared to the user in the last SHARED_DAYS
    friends_bought: int = Field(50, ge=0)  # bought by people the user sees in the last FRIENDS_DAYS
    friends_trending: int = Field(30, ge=0)  # most engaged with by the user's community lately


class RankerParams(_Strict):
    """LightGBM over the union of candidates: LambdaRank by default."""

    # lambdarank: pairwise, NDCG-weighted; rank_xendcg: listwise cross-entropy; binary: pointwise logloss on
    # "bought or carted" (label > 0), scores taken as they come
    objective: Literal["lambdarank", "rank_xendcg", "binary"] = "lambdarank"
    num_leaves: int = Field(31, ge=2)
    learning_rate: float = Field(0.05, gt=0.0)
    max_rounds: int = Field(400, ge=1)
    early_stopping_rounds: int = Field(40, ge=1)
    # 0: stop on the validation users' NDCG@20; k >= 2: pick the round count by k-fold cross-validation over the
    # training groups (their mean NDCG@20 curve), for data whose validation users are too few to stop on
    stopping_folds: int = Field(0, ge=0, le=20)
    min_data_in_leaf: int = Field(50, ge=1)
    feature_fraction: float = Field(0.8, gt=0.0, le=1.0)
    bagging_fraction: float = Field(0.8, gt=0.0, le=1.0)
    lambda_l2: float = Field(1.0, ge=0.0)
    negatives_per_group: int = Field(100, ge=1)  # training rows: all positives plus this many sampled negatives
    validation_share: float = Field(0.2, gt=0.0, lt=1.0)  # users held out for early stopping
    label_windows: int = Field(1, ge=1, le=12)  # training groups from this many consecutive label windows
    social: bool = True  # False: no social candidate sources, social features left missing
    seed: int = 23

    @model_validator(mode="after")
    def _folds_split(self) -> RankerParams:
        if self.stopping_folds == 1:
            raise ValueError("ranker.stopping_folds: 0 stops on the validation users, 2 or more cross-validates")
        return self


class PropensityParams(_Strict):
    """The propensity model of segments: a logistic regression per target kind on the validation window."""

    kinds: tuple[Literal["category", "brand", "item"], ...] = ("category", "brand", "item")
    min_positives: int = Field(10, ge=1)  # a target takes part when this many users bought it in the label window
    max_rows: int = Field(200_000, ge=1_000)  # per kind: every positive plus negatives sampled at one rate
    max_item_targets: int = Field(200, ge=1)  # item kind: the items most bought in the label window
    c: float = Field(1.0, gt=0.0)  # inverse strength of the L2 penalty
    seed: int = 29


class SplitParams(_Strict):
    """The holdout: its protocol, and for `time` a cut on the data's own time resolution."""

    protocol: Literal["auto", "time", "random", "last"] = "auto"
    test_fraction: float = Field(0.1, gt=0.0, lt=0.9)
    cut: datetime | None = None  # an explicit cut (UTC) overrides test_fraction
    max_buckets: int = Field(60, ge=2)  # at most this many distinct times: a bucketed data set
    test_buckets: int = Field(1, ge=1)  # a bucketed data set holds out its last buckets
    random_seed: int = 11  # for the per-user random split used when time carries no order


class IndexParams(_Strict):
    kind: Literal["auto", "flat", "pq", "hnsw"] = "auto"
    flat_max_items: int = 50_000  # auto: exact search up to this many items, "pq" above
    refine_factor: float = Field(4.0, ge=1.0)  # pq: exact inner products for this many times k of its best
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128


class PopularityParams(_Strict):
    trending_half_life_days: float = Field(7.0, gt=0.0)


class RepurchaseParams(_Strict):
    threshold: float = Field(0.1, ge=0.0, le=1.0)
    min_pairs: int = 20
    overrides: dict[str, bool] = {}


class EvalParams(_Strict):
    k: tuple[int, ...] = (10, 20)
    # Also train and score, in the same run on the same holdout, the ranker without the social sources and
    # features (row ranker_no_social) and ALS with friend-smoothed user vectors (row als_social).
    social_ablation: bool = False
    social_smoothing: float = Field(0.3, ge=0.0, le=1.0)  # als_social: (1 - s) * own + s * friends' mean
    # Request-time replay (training.replay): > 0 also scores both rankers on H-hour slices of the test window,
    # each with the state as of the slice start; at most `replay_max_slices` slices, sampled with the seed.
    replay_hours: float = Field(0.0, ge=0.0)
    replay_max_slices: int = Field(24, ge=1)
    replay_seed: int = 31
    # Also train both rankers on request-time groups of window A's label period (alone, and stacked with the
    # static groups); per ranker, keep what scores best on the held-out users' request-time groups.
    replay_training: bool = True

    @model_validator(mode="after")
    def _replay_needs_ablation(self) -> EvalParams:
        if self.replay_hours > 0 and not self.social_ablation:
            raise ValueError("evaluation.replay_hours compares the two rankers: it needs social_ablation: true")
        return self


class TrainParams(_Strict):
    event_weights: dict[str, float] = {}  # merged over the defaults of features.weights
    als: ALSParams = ALSParams()
    bpr: BPRParams = BPRParams()
    neighbours: NeighbourParams = NeighbourParams()
    candidates: CandidateParams = CandidateParams()
    ranker: RankerParams = RankerParams()
    propensity: PropensityParams = PropensityParams()
    split: SplitParams = SplitParams()
    index: IndexParams = IndexParams()
    popularity: PopularityParams = PopularityParams()
    repurchase: RepurchaseParams = RepurchaseParams()
    evaluation: EvalParams = EvalParams()
    max_reject_share: float = Field(0.01, ge=0.0, le=1.0)
    # What answers feeds: auto (chosen on validation, training.selection), or pinned to one pipeline whatever
    # validation says (its best setting is still chosen on validation); a pinned ranker needs the time protocol
    serve: Literal["auto", "ranker", "fused", "als", "item_knn", "ease", "trending", "popular"] = "auto"

    def candidate_counts(self) -> dict[str, int]:
        """Items per source as fitted and served: the social sources are off when the ranker is not social."""
        counts = self.candidates.model_dump()
        if not self.ranker.social:
            counts |= {name: 0 for name in ("shared", "friends_bought", "friends_trending")}
        return counts

    @property
    def weights(self) -> dict[str, float]:
        return merged_weights(self.event_weights)

    def digest(self) -> str:
        canonical = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()[:16]

    def flat(self) -> dict[str, str]:
        """Dotted names to values, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: object) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), sub)
            else:
                out[prefix] = str(value)

        walk("", self.model_dump(mode="json"))
        out["event_weights"] = str(self.weights)
        return out


def load_params(path: Path | None) -> TrainParams:
    if path is None:
        return TrainParams()
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: training parameters must be a mapping")
    return TrainParams.model_validate(data)
