"""Choosing the served pipeline on validation: the ranker, or one source on its own.

Every candidate pipeline (each single source at a few settings, and the ranker when the protocol trained
one) builds each validation user's final list with `features.served.final_list`, the function serving
uses, and is scored on the same users. The best single source wins unless the ranker beats it with the
lower end of its paired-bootstrap interval above 1: a ranker without that evidence is not served.
Relevant items are the validation pairs the user had no interaction with before, and repeat purchases
where the repurchase policy offers an item again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.candidates import top_scores
from features.feed import Candidates, Source
from features.interactions import user_items_matrix
from features.popularity import ItemPopularity, item_popularity
from features.repurchase import NO_CATEGORY, RepurchasePolicy
from features.served import (
    FUSION_DEPTH,
    SOURCE_OF,
    ItemWeights,
    Pipeline,
    fallback_steps,
    final_list,
    fuse,
    history_of,
    personal_step,
    seen_items,
)
from features.vocab import Vocabulary
from features.weights import CONVERSION_TYPES
from training.als import Factors, fit_als
from training.evaluate import Targets, bootstrap_ratio, per_user_metrics, score_lists, targets_from_pairs
from training.params import ALSParams, TrainParams
from training.sources import EASE_DROPOUTS, EASE_LAMBDAS, EaseSystem, ease_lambdas, fit_bm25, pruned

FALLBACK_DEPTH = 2000
MAX_USERS = 10_000  # validation users a choice is made on (a seeded sample when there are more)
SELECTION_K = 20
BOOTSTRAP_SEED = 41


def als_variants(params: TrainParams) -> dict[str, ALSParams]:
    """The ALS settings tried: the configured one, plain confidence (alpha 1 on summed weights), and a wider,
    lighter-regularized model."""
    base = params.als
    return {
        "als": base,
        "als_linear": base.model_copy(update={"alpha": 1.0, "confidence_scale": "linear"}),
        "als_wide": base.model_copy(update={"factors": 128, "regularization": 0.01, "alpha": 1.0,
                                            "confidence_scale": "linear"}),
    }


@dataclass(frozen=True, slots=True)
class Candidate:
    """One pipeline setting tried on validation."""

    name: str  # e.g. "ease_l200", "als_linear"
    pipeline: Pipeline
    als: ALSParams | None = None  # the ALS setting (of the pipeline, or of its ALS part)
    ease_lambda: float | None = None
    ease_dropout: float = 0.0
    parts: tuple[Pipeline, ...] = ()  # a fused pipeline's parts, leading one first
    weights: tuple[float, ...] = ()


@dataclass(slots=True)
class Selection:
    """The pipeline chosen and the evidence it was chosen on."""

    chosen: Candidate
    exclude_seen: bool
    scores: dict[str, float] = field(default_factory=dict)  # candidate -> NDCG@20 on validation
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate -> every metric on validation
    comparison: dict[str, float | str] = field(default_factory=dict)  # ranker vs best single source
    users: int = 0
    note: str = ""

    def evidence(self) -> dict[str, float]:
        out = {f"validation.{name}.{metric}": value for name, row in self.rows.items()
               for metric, value in row.items()}
        out |= {f"selection.{k}": float(v) for k, v in self.comparison.items() if not isinstance(v, str)}
        return out


@dataclass(frozen=True, slots=True)
class ValidationSet:
    """The part the candidates are fitted on, with its vocabularies, and the users they are scored on."""

    users: Vocabulary
    items: Vocabulary
    history: sp.csr_matrix  # users x items: summed weights of the fitted part (floored at 0)
    bought: sp.csr_matrix  # users x items: bought in the fitted part
    repeatable: np.ndarray  # per item: its category may be bought again
    popularity: ItemPopularity
    targets: Targets
    unavailable: np.ndarray | None = None  # per item: out of stock in the catalog (serving never shows it)


def relevant_targets(fit: pd.DataFrame, held: pd.DataFrame, users: Vocabulary, items: Vocabulary,
                     repeatable: np.ndarray) -> Targets:
    """Per user of `held`: the pairs with no interaction in `fit`, plus purchases of items they bought in
    `fit` whose category may be bought again. Items `fit` does not know count as missed targets."""
    seen = set(zip(fit["user_id"].tolist(), fit["item_id"].tolist(), strict=True))
    bought = fit.loc[fit["event_type"].isin(CONVERSION_TYPES)]
    bought_pairs = set(zip(bought["user_id"].tolist(), bought["item_id"].tolist(), strict=True))
    pairs = held[["user_id", "item_id", "event_type"]]
    item_idx = items.indexes(pairs["item_id"])
    again = np.asarray([idx >= 0 and bool(repeatable[idx]) for idx in item_idx.tolist()], dtype=bool)
    keys = list(zip(pairs["user_id"].tolist(), pairs["item_id"].tolist(), strict=True))
    new = np.fromiter((key not in seen for key in keys), dtype=bool, count=len(keys))
    repeat = pairs["event_type"].isin(CONVERSION_TYPES).to_numpy() & again & np.fromiter(
        (key in bought_pairs for key in keys), dtype=bool, count=len(keys))
    return targets_from_pairs(pairs.loc[new | repeat], users, items, "new pairs and repeat buys")


def _sampled(targets: Targets, most: int, seed: int) -> Targets:
    if len(targets.user_ids) <= most:
        return targets
    keep = np.sort(np.random.default_rng(seed).choice(len(targets.user_ids), most, replace=False))
    return replace(targets, user_ids=targets.user_ids[keep], user_idx=targets.user_idx[keep],
                   items=[targets.items[i] for i in keep.tolist()], n_targets=targets.n_targets[keep])


def validation_set(fit: pd.DataFrame, held: pd.DataFrame, users: Vocabulary, items: Vocabulary,
                   meta: pd.DataFrame, policy: RepurchasePolicy, params: TrainParams) -> ValidationSet:
    weights = params.weights
    as_of = fit["ts"].max()
    history = user_items_matrix(fit, users, items, weights)
    repeatable = policy.repeatable_mask(item_categories(meta))
    unavailable = (meta["in_stock"] == False).fillna(False).to_numpy(dtype=bool)  # noqa: E712
    bought = fit.loc[fit["event_type"].isin(CONVERSION_TYPES)]
    rows, cols = users.indexes(bought["user_id"]), items.indexes(bought["item_id"])
    keep = (rows >= 0) & (cols >= 0)
    bought_matrix = sp.csr_matrix((np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], cols[keep])),
                                  shape=(len(users), len(items)))
    bought_matrix.sum_duplicates()
    popularity = item_popularity(fit, items, weights, as_of, params.popularity.trending_half_life_days)
    targets = _sampled(relevant_targets(fit, held, users, items, repeatable), MAX_USERS, params.split.random_seed)
    return ValidationSet(users, items, history, bought_matrix.tocsr(), repeatable, popularity, targets, unavailable)


def user_blocked_items(valid: ValidationSet, user: int, exclude_seen: bool) -> np.ndarray:
    """The items a user's list skips beyond the unavailable ones, as serving computes them: bought items of
    once-only categories, and seen ones (`features.served.seen_items`) when the pipeline blocks them."""
    if user < 0:
        return np.empty(0, dtype=np.int64)
    bought = valid.bought.indices[valid.bought.indptr[user] : valid.bought.indptr[user + 1]].astype(np.int64)
    once: np.ndarray = bought[~valid.repeatable[bought]]
    if not exclude_seen:
        return once
    items: np.ndarray = np.union1d(once, seen_items(history_of(valid.history, user)[0], bought, valid.repeatable))
    return items


class _Mask:
    """One blocked-items mask reused user after user: the unavailable items always, a user's own for a while."""

    def __init__(self, valid: ValidationSet) -> None:
        n_items = len(valid.items)
        self.base = valid.unavailable if valid.unavailable is not None else np.zeros(n_items, dtype=bool)
        self.mask = self.base.copy()

    def set(self, items: np.ndarray) -> np.ndarray:
        self.mask[items] = True
        return self.mask

    def reset(self, items: np.ndarray) -> None:
        self.mask[items] = self.base[items]


PersonalFn = Callable[[int, np.ndarray], list[Candidates]]
PartFn = Callable[[int, np.ndarray, int], Candidates | None]  # (user row, blocked, depth) -> a part's best items
FAMILY = {Pipeline.ALS: "als", Pipeline.ITEM_KNN: "item", Pipeline.EASE: "item", Pipeline.TRENDING: "popularity",
          Pipeline.POPULAR: "popularity"}
FUSION_WEIGHTS = (0.25, 0.5, 0.75)  # the leading part's share in a fused list
CHUNK = 128


def lists_for(valid: ValidationSet, personal: PersonalFn, pipeline: Pipeline, exclude_seen: bool,
              n: int = SELECTION_K) -> list[np.ndarray]:
    """Every validation user's final list under one pipeline."""
    pop = valid.popularity
    fallback = fallback_steps(pop.trending, pop.popular, n + FALLBACK_DEPTH, pipeline)
    out = []
    shared = _Mask(valid)
    for user in valid.targets.user_idx.tolist():
        items = user_blocked_items(valid, user, exclude_seen)
        blocked = shared.set(items)
        steps = personal(user, blocked) if user >= 0 else []
        out.append(final_list(steps, fallback, n, blocked).items)
        shared.reset(items)
    return out


def als_part(valid: ValidationSet, factors: Factors) -> PartFn:
    """ALS's best items per validation user, scored a chunk of users at a time (one matrix product, not one
    pass over the catalog per user), deep enough for any list built from them."""
    rows = np.unique(valid.targets.user_idx[valid.targets.user_idx >= 0])
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    shared = _Mask(valid)
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        scores = factors.user_factors[chunk] @ factors.item_factors.T
        for user, row in zip(chunk.tolist(), scores, strict=True):
            extra = int(valid.history.indptr[user + 1] - valid.history.indptr[user])
            items = user_blocked_items(valid, user, exclude_seen=False)
            cache[user] = top_scores(row, FUSION_DEPTH + extra, shared.set(items))
            shared.reset(items)

    def part(user: int, blocked: np.ndarray, depth: int) -> Candidates | None:
        if user not in cache:
            return None
        items, values = cache[user]
        keep = ~blocked[items]
        return Candidates(Source.ALS, items[keep][:depth], values[keep][:depth])

    return part


def scored_part(valid: ValidationSet, pipeline: Pipeline, item_weights: ItemWeights | None = None) -> PartFn:
    popularity = {Pipeline.TRENDING: valid.popularity.trending, Pipeline.POPULAR: valid.popularity.popular}
    if pipeline in popularity:  # one order for everyone: each user's part is its first open items
        scores = popularity[pipeline]
        positive = np.flatnonzero(scores > 0)
        order = positive[np.lexsort((positive, -scores[positive]))]

        def ranked(user: int, blocked: np.ndarray, depth: int) -> Candidates | None:
            del user
            keep = order[~blocked[order]][:depth]
            return Candidates(SOURCE_OF[pipeline], keep.astype(np.int64), scores[keep].astype(np.float32))

        return ranked

    def part(user: int, blocked: np.ndarray, depth: int) -> Candidates | None:
        return personal_step(pipeline, depth, blocked, item_weights=item_weights,
                             history=history_of(valid.history, user), popularity=popularity.get(pipeline))

    return part


def part_personal(part: PartFn) -> PersonalFn:
    def personal(user: int, blocked: np.ndarray) -> list[Candidates]:
        step = part(user, blocked, SELECTION_K)
        return [step] if step is not None else []

    return personal


def fused_personal(parts: Sequence[PartFn], weights: Sequence[float]) -> PersonalFn:
    def personal(user: int, blocked: np.ndarray) -> list[Candidates]:
        step = fuse([p(user, blocked, FUSION_DEPTH) for p in parts], weights, FUSION_DEPTH)
        return [step] if step is not None else []

    return personal


def ranked_personal(ranked: dict[int, np.ndarray]) -> PersonalFn:
    """The ranker's ordered union per user row (scored elsewhere), as the personal step."""

    def personal(user: int, blocked: np.ndarray) -> list[Candidates]:
        items = ranked.get(user)
        if items is None or not len(items):
            return []
        return [Candidates(Source.ALS, items, np.zeros(len(items), dtype=np.float32))]

    return personal


def select_pipeline(valid: ValidationSet, params: TrainParams, say: Callable[[str], None],
                    ranker_lists: dict[int, np.ndarray] | None = None,
                    als_fits: dict[str, Factors] | None = None) -> Selection:
    """Fit each single source on the validation set's fitted part, score every pipeline on its users, and
    choose; `ranker_lists` (user row -> ranked items) adds the ranker, `als_fits` reuses fitted ALS."""
    targets = valid.targets
    ks = (10, SELECTION_K)
    n_items = len(valid.items)
    results: dict[str, float] = {}
    rows: dict[str, dict[str, float]] = {}
    per_user: dict[str, np.ndarray] = {}
    personal_of: dict[str, tuple[Candidate, PersonalFn]] = {}
    parts: dict[str, tuple[Candidate, PartFn]] = {}

    def measure(candidate: Candidate, personal: PersonalFn, exclude_seen: bool = True) -> None:
        lists = lists_for(valid, personal, candidate.pipeline, exclude_seen)
        row = score_lists(lists, targets, ks, n_items)
        key = candidate.name if exclude_seen else f"{candidate.name}_with_seen"
        results[key] = row[f"ndcg_at_{SELECTION_K}"]
        rows[key] = row
        per_user[key] = per_user_metrics(lists, targets, SELECTION_K)
        personal_of[key] = (candidate, personal)

    def single(candidate: Candidate, part: PartFn) -> None:
        parts[candidate.name] = (candidate, part)
        measure(candidate, part_personal(part))

    for plain in (Pipeline.TRENDING, Pipeline.POPULAR):
        single(Candidate(plain.value, plain), scored_part(valid, plain))
    fits = dict(als_fits or {})
    for variant, als in als_variants(params).items():
        factors = fits.get(variant) or fit_als(valid.history, als)
        single(Candidate(variant, Pipeline.ALS, als=als), als_part(valid, factors))
    single(Candidate("item_knn", Pipeline.ITEM_KNN),
           scored_part(valid, Pipeline.ITEM_KNN, fit_bm25(valid.history)))
    lambdas = ease_lambdas(*valid.history.shape)
    if lambdas:
        system = EaseSystem(valid.history)
        for lam in lambdas:
            single(Candidate(f"ease_l{lam:g}", Pipeline.EASE, ease_lambda=lam),
                   scored_part(valid, Pipeline.EASE, pruned(system.weights(lam))))
        lam = max(lambdas, key=lambda value: results[f"ease_l{value:g}"])
        for dropout in EASE_DROPOUTS if len(lambdas) == len(EASE_LAMBDAS) else ():  # cheap inversions only
            single(Candidate(f"ease_l{lam:g}_d{dropout:g}", Pipeline.EASE, ease_lambda=lam, ease_dropout=dropout),
                   scored_part(valid, Pipeline.EASE, pruned(system.weights(lam, dropout))))
        del system
    best_single = max(results, key=lambda key: results[key])
    lead, lead_part = parts[best_single]
    for family in sorted(set(FAMILY.values()) - {FAMILY[lead.pipeline]}):
        other = max((name for name, (c, _) in parts.items() if FAMILY[c.pipeline] == family),
                    key=lambda name: results[name])
        second, second_part = parts[other]
        for weight in FUSION_WEIGHTS:
            fused = Candidate(f"fused_{lead.name}_{second.name}_w{weight:g}", Pipeline.FUSED,
                              als=lead.als or second.als, ease_lambda=lead.ease_lambda or second.ease_lambda,
                              ease_dropout=max(lead.ease_dropout, second.ease_dropout),
                              parts=(lead.pipeline, second.pipeline), weights=(weight, 1.0 - weight))
            measure(fused, fused_personal([lead_part, second_part], fused.weights))
    best = max(results, key=lambda key: results[key])
    comparison: dict[str, float | str] = {"best_single": best_single, "best_without_ranker": best}
    chosen = best
    note = f"{best} is the best on validation"
    if ranker_lists is not None:
        measure(Candidate("ranker", Pipeline.RANKER), ranked_personal(ranker_lists))
        ranked = np.isin(targets.user_idx, np.fromiter(ranker_lists, dtype=np.int64, count=len(ranker_lists)))
        low, mid, high = bootstrap_ratio(per_user["ranker"][ranked], per_user[best][ranked],
                                         np.random.default_rng(BOOTSTRAP_SEED))
        comparison |= {"ranker_ratio": mid, "ranker_ci_low": low, "ranker_ci_high": high,
                       "ranker_users": float(ranked.sum())}
        if low > 1.0:
            chosen = "ranker"
            note = f"the ranker beats {best} on validation: {mid:.3f} ({low:.3f} - {high:.3f})"
        else:
            note = (f"the ranker is not served: over {best} it scores {mid:.3f} ({low:.3f} - {high:.3f}), "
                    "an interval that does not clear 1")
    if params.serve != "auto":
        pinned = [name for name, (c, _) in personal_of.items() if c.pipeline.value == params.serve]
        if not pinned:
            raise ValueError(f"serve: {params.serve} was not trained under this protocol (the ranker needs time)")
        chosen = max(pinned, key=lambda name: results[name])
        note = f"pinned by the parameters (serve: {params.serve}); {note}"
    candidate, personal = personal_of[chosen]
    measure(candidate, personal, exclude_seen=False)  # does keeping the user's own items help here?
    exclude_seen = results[chosen] >= results[f"{chosen}_with_seen"]
    say("validation NDCG@20 by pipeline: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                       sorted(results.items(), key=lambda kv: -kv[1])))
    say(f"served pipeline: {chosen} ({note}); items the user already interacted with are "
        f"{'left out' if exclude_seen else 'kept'}")
    served = chosen if exclude_seen else f"{chosen}_with_seen"
    rows["served"] = rows[served]
    return Selection(candidate, exclude_seen, results, rows, comparison, len(targets.user_ids), note)


def item_categories(meta: pd.DataFrame) -> np.ndarray:
    return meta["category"].fillna(NO_CATEGORY).replace("nan", NO_CATEGORY).to_numpy(dtype=object)
