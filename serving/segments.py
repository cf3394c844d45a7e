"""The segment engine: from a definition to an ordered list of (user, score) over a bundle's users.

Propensity and lookalike retrieve from FAISS inner-product indexes over the user vectors (raw for
propensity, normalized for lookalike's cosine); filters that the bundle can answer are a bitmap inside
the search, so a filtered top-N is exact without over-fetching. Propensity adds everyone who bought or
touched the target, and the most active users, to what FAISS finds and scores them all with the bundle's
propensity model (features.propensity, fitted at training time). What only the online store knows (erasure,
consent, through `serving.privacy`) is checked on the ordered candidates, fetching more until the size is
reached: an erased user or one who refused marketing is never a member, nor a lookalike seed, a community
anchor or a buyer whose friends make a segment.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import scipy.sparse as sp

from features.propensity import PropensityContext, PropensityModel, TargetKind, fixed_score, mean_query, target_vectors
from features.rfm import GROUP_CODES, RFM, compute_rfm
from features.state import DAY, USER_EVENT_TYPES
from serving.privacy import Privacy
from serving.segment_schemas import (
    MAX_MAX_SEEDS,
    Filters,
    LifecycleQuery,
    LookalikeQuery,
    PropensityQuery,
    SegmentDefinition,
    SocialQuery,
)
from serving.segment_social import ReachGraph, reach_graph
from training.bundle import Bundle

F32 = np.float32
CONSENT_CHUNK = 2048  # candidates checked against the store at a time


class SegmentError(ValueError):
    """A definition this bundle cannot answer (unknown item, category, missing data): a 4xx for the caller."""


@dataclass(frozen=True, slots=True)
class Members:
    """A segment, best first."""

    user_idx: np.ndarray  # int64
    scores: np.ndarray  # float32


Fetch = Callable[[int], tuple[np.ndarray, np.ndarray]]  # n -> the best n candidates (fewer: exhausted)


def score_moments(user_factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the user vectors: the mean and spread of u.q over all users for any q."""
    n = max(len(user_factors), 1)
    mean = user_factors.mean(axis=0, dtype=np.float64)
    second = (user_factors.T @ user_factors).astype(np.float64) / n  # one f x f product, no copy of the users
    covariance: np.ndarray = second - np.outer(mean, mean)
    return mean, covariance


def target_kind(query: PropensityQuery) -> TargetKind:
    return "item" if query.item_id is not None else "category" if query.category is not None else "brand"


class SegmentEngine:
    """Everything a bundle needs to answer segments; indexes and aggregates are built on first use."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._lock = threading.Lock()
        self._cache: dict[str, Any] = {}
        self.n_users = len(bundle.users)
        self.item_buyers = np.asarray(bundle.state.item_buyers, dtype=np.float64)

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        value = self._cache.get(key)
        if value is None:
            with self._lock:
                value = self._cache.get(key)
                if value is None:
                    value = build()
                    self._cache[key] = value
        return value

    # -- shared structures -------------------------------------------------------------------------
    def user_index(self) -> faiss.Index:
        def build() -> faiss.Index:
            factors = np.ascontiguousarray(self.bundle.user_factors, dtype=F32)
            index = faiss.IndexFlatIP(factors.shape[1])
            index.add(factors)
            return index
        index: faiss.Index = self._cached("user_ip", build)
        return index

    def cosine_index(self) -> faiss.Index:
        def build() -> faiss.Index:
            factors = np.array(self.bundle.user_factors, dtype=F32, copy=True)
            faiss.normalize_L2(factors)
            index = faiss.IndexFlatIP(factors.shape[1])
            index.add(factors)
            return index
        index: faiss.Index = self._cached("user_cos", build)
        return index

    def purchases_csc(self) -> sp.csc_matrix:
        matrix: sp.csc_matrix = self._cached("purchases_csc", lambda: self.bundle.state.pair_purchases.tocsc())
        return matrix

    def category_purchases(self) -> sp.csr_matrix:
        """users x categories (manifest order): purchases."""
        def build() -> sp.csr_matrix:
            codes = np.asarray(self.bundle.state.item_category)
            n_cat = max(len(self.bundle.manifest.categories), 1)
            ok = codes >= 0
            onehot = sp.csr_matrix((np.ones(int(ok.sum())), (np.flatnonzero(ok), codes[ok])),
                                   shape=(len(codes), n_cat))
            return sp.csr_matrix(self.bundle.state.pair_purchases @ onehot)
        matrix: sp.csr_matrix = self._cached("category_purchases", build)
        return matrix

    def rfm(self) -> RFM:
        value: RFM = self._cached("rfm", lambda: compute_rfm(self.bundle.state))
        return value

    def graph(self) -> ReachGraph:
        value: ReachGraph = self._cached("graph", lambda: reach_graph(self.bundle.social_graph, self.n_users))
        return value

    # -- targets -----------------------------------------------------------------------------------
    def _category_code(self, name: str) -> int:
        try:
            return self.bundle.manifest.categories.index(name)
        except ValueError:
            raise SegmentError(f"unknown category {name!r}") from None

    def target_items(self, query: PropensityQuery) -> np.ndarray:
        if query.item_id is not None:
            idx = self.bundle.items.index_of(query.item_id)
            if idx is None:
                raise SegmentError(f"unknown item {query.item_id!r}")
            return np.asarray([idx], dtype=np.int64)
        if query.category is not None:
            items = np.flatnonzero(np.asarray(self.bundle.state.item_category) == self._category_code(query.category))
        else:
            brands = self.bundle.manifest.brands
            if query.brand not in brands:
                raise SegmentError(f"unknown brand {query.brand!r}")
            items = np.flatnonzero(np.asarray(self.bundle.state.item_brand) == brands.index(str(query.brand)))
        if not len(items):
            raise SegmentError("no item of this bundle belongs to the target")
        return items.astype(np.int64)

    def buyers_of(self, items: np.ndarray) -> np.ndarray:
        bought = np.asarray(self.purchases_csc()[:, items].sum(axis=1)).ravel()
        return bought > 0

    # -- filters -----------------------------------------------------------------------------------
    def filter_mask(self, filters: Filters, target_items: np.ndarray | None) -> np.ndarray | None:
        """Users allowed by the filters the bundle can answer; None when nothing is filtered."""
        if filters.attributes:
            raise SegmentError("attribute filters need a users table, and this bundle carries none "
                               "(it holds only the user id vocabulary)")
        mask = np.ones(self.n_users, dtype=bool)
        state = self.bundle.state
        if filters.active_days is not None:
            since = state.cutoff_seconds - filters.active_days * DAY
            mask &= np.nan_to_num(state.user_last_seen, nan=-np.inf) >= since
        if filters.bought_categories:
            codes = [self._category_code(c) for c in filters.bought_categories]
            mask &= np.asarray(self.category_purchases()[:, codes].sum(axis=1)).ravel() > 0
        if filters.never_bought_categories:
            codes = [self._category_code(c) for c in filters.never_bought_categories]
            mask &= np.asarray(self.category_purchases()[:, codes].sum(axis=1)).ravel() == 0
        if filters.exclude_current_buyers:
            if target_items is None:
                raise SegmentError("exclude_current_buyers needs a target: use it with a propensity segment")
            mask &= ~self.buyers_of(target_items)
        return None if mask.all() else mask

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, definition: SegmentDefinition, privacy: Privacy,
                 seeds: Callable[[str], list[str]] | None = None) -> Members:
        """The members of a definition; `seeds` resolves a seed segment id to its user ids."""
        purposes = ["marketing", *(definition.filters.consent or [])]
        if isinstance(definition, PropensityQuery):
            items = self.target_items(definition)
            mask = self.filter_mask(definition.filters, items)
            fetch = self._propensity(items, mask, definition.min_score, target_kind(definition))
        elif isinstance(definition, LookalikeQuery):
            fetch = self._lookalike(definition, seeds, privacy, purposes)
        elif isinstance(definition, LifecycleQuery):
            fetch = self._dense_fetch(self._lifecycle_scores(definition), self.filter_mask(definition.filters, None),
                                      definition.min_score)
        else:
            fetch = self._dense_fetch(self._social_scores(definition, privacy, purposes),
                                      self.filter_mask(definition.filters, None), definition.min_score)
        return take_allowed(fetch, definition.size, self.bundle.users.ids, privacy, purposes)

    def propensity_context(self) -> PropensityContext:
        value: PropensityContext = self._cached("propensity_context", lambda: PropensityContext(
            self.bundle.state, self.bundle.user_factors, self.bundle.item_factors))
        return value

    def propensity_model(self, kind: TargetKind) -> PropensityModel | None:
        """The bundle's fitted model for this kind of target; None (the fixed formula) when it has none or one
        fitted on other features."""
        model = self.bundle.manifest.propensity.get(kind)
        return model if model is not None and model.usable() else None

    def _propensity(self, items: np.ndarray, mask: np.ndarray | None, min_score: float | None,
                    kind: TargetKind) -> Fetch:
        """Everyone who bought or touched the target, plus for the others (whose history terms are zero) the
        top by ALS from FAISS and the top by the model's user terms; all scored with the bundle's propensity
        model (the probability of buying the target within the model's label window). Bundles without a
        model use the fixed formula."""
        model = self.propensity_model(kind)
        if model is None:
            return self._fixed_propensity(items, mask, min_score)
        context = self.propensity_context()
        target = context.target(items)
        retrieve = self._faiss_fetch(self.user_index(), target.query[None, :], mask, None)
        known = target.interactors()
        active: np.ndarray = self._cached(f"propensity_active_{kind}",
                                          lambda: np.argsort(-context.user_logit(model), kind="stable"))
        if mask is not None:
            known, active = known[mask[known]], active[mask[active]]
        unknown = np.ones(self.n_users, dtype=bool)
        unknown[known] = False

        def fetch(n: int) -> tuple[np.ndarray, np.ndarray]:
            # the others: the best n by ALS (FAISS) and the best n by the model's user terms (activity), in
            # user order; a bitmap rather than np.unique, whose hashing costs ~6 ms on these 24k ids
            found, _ = retrieve(n)
            others = np.zeros(self.n_users, dtype=bool)
            others[found] = True
            others[active[:n]] = True
            cand, scores = context.best_probability(model, target, np.concatenate(
                [known, np.flatnonzero(others & unknown)]), n)
            return best_unique(cand, scores, n, min_score)
        return fetch

    def _fixed_propensity(self, items: np.ndarray, mask: np.ndarray | None, min_score: float | None) -> Fetch:
        """The scoring of bundles without a model: FAISS by ALS plus the target's past buyers, re-scored with
        `fixed_score`."""
        vectors, weights = target_vectors(self.bundle.item_factors, items, self.item_buyers)
        query = mean_query(vectors, weights)[None, :]
        retrieve = self._faiss_fetch(self.user_index(), query, mask, None)
        purchases = self.purchases_csc()[:, items]
        past = np.asarray(purchases.sum(axis=1)).ravel()
        buyers = np.flatnonzero(past > 0)
        if mask is not None:
            buyers = buyers[mask[buyers]]
        last_csc: sp.csc_matrix = self._cached("last_purchase_csc",
                                               lambda: self.bundle.state.pair_last_purchase.tocsc())
        last = last_csc[:, items].max(axis=1).toarray().ravel() if len(buyers) else np.zeros(self.n_users)
        factors = self.bundle.user_factors
        now = self.bundle.state.cutoff_seconds
        mean, covariance = self._cached("moments", lambda: score_moments(factors))
        q = query[0].astype(np.float64)
        als_mean, als_std = float(mean @ q), float(np.sqrt(max(q @ covariance @ q, 0.0)))

        def fetch(n: int) -> tuple[np.ndarray, np.ndarray]:
            found, _ = retrieve(n + len(buyers))
            cand = np.union1d(found, buyers)
            als = (factors[cand] @ query[0]).astype(np.float64)
            days = np.where(past[cand] > 0, (now - last[cand]) / DAY, np.inf)
            scores = fixed_score(als, als_mean, als_std, past[cand], days).astype(F32)
            return merge_max(cand, scores, n, min_score)
        return fetch

    def _lookalike(self, query: LookalikeQuery, seeds: Callable[[str], list[str]] | None, privacy: Privacy,
                   purposes: Sequence[str]) -> Fetch:
        if query.seed_user_ids is not None:
            seed_ids = query.seed_user_ids
        else:
            if seeds is None:
                raise SegmentError("seed segments cannot be read here")
            seed_ids = seeds(str(query.seed_segment_id))
        seed_ids = [u for u, ok in zip(seed_ids, privacy.allowed(seed_ids, purposes), strict=True) if ok]
        seed_idx = self.bundle.users.indexes(seed_ids)
        seed_idx = np.unique(seed_idx[seed_idx >= 0])
        if not len(seed_idx):
            raise SegmentError("none of the seed users is known to this bundle (erased or opted-out seeds do "
                               "not count)")
        mask = self.filter_mask(query.filters, None)
        mask = np.ones(self.n_users, dtype=bool) if mask is None else mask
        mask[seed_idx] = False  # seeds are never members
        vectors = np.array(self.bundle.user_factors[seed_idx], dtype=F32, copy=True)
        faiss.normalize_L2(vectors)
        if query.method == "centroid":
            centroid = vectors.mean(axis=0, keepdims=True)
            faiss.normalize_L2(centroid)
            vectors = centroid
        elif len(vectors) > MAX_MAX_SEEDS:
            raise SegmentError(f"method 'max' searches each seed: give at most {MAX_MAX_SEEDS} seeds, or use "
                               "'centroid'")
        return self._faiss_fetch(self.cosine_index(), vectors, mask, query.min_score)

    def _lifecycle_scores(self, query: LifecycleQuery) -> np.ndarray:
        rfm = self.rfm()
        member = rfm.group >= 0
        if query.groups:
            member &= np.isin(rfm.group, [GROUP_CODES[g] for g in query.groups])
        return np.where(member, rfm.score, np.nan)

    def _social_scores(self, query: SocialQuery, privacy: Privacy, purposes: Sequence[str]) -> np.ndarray:
        state = self.bundle.state
        if query.signal == "top_sharers":
            shares = np.asarray(state.user_type_counts[:, USER_EVENT_TYPES.index("share")], dtype=np.float64)
            return np.where(shares > 0, shares, np.nan)
        if query.signal == "influencers":
            # Members drove at least one attributed purchase; the score is features.attribution's influence
            # (smoothed conversions per recipient times reach, plus a share of their converts' influence).
            table = self.bundle.user_influence
            idx = self.bundle.users.indexes(table.index.astype(str).to_series())
            ok = (idx >= 0) & (table["conversions"].to_numpy() > 0)
            scores = np.full(self.n_users, np.nan)
            scores[idx[ok]] = table["influence"].to_numpy(dtype=np.float64)[ok]
            return scores
        graph = self.graph()
        if query.signal == "friends_of_buyers":
            item = self.bundle.items.index_of(str(query.item_id))
            if item is None:
                raise SegmentError(f"unknown item {query.item_id!r}")
            buyers = self.buyers_of(np.asarray([item]))
            reached = graph.friends_of(self._sharing(buyers, privacy))
            return np.where((reached > 0) & ~buyers, reached, np.nan)
        member = self.bundle.users.index_of(str(query.user_id))
        if member is None or not privacy.allowed([str(query.user_id)], purposes)[0]:
            raise SegmentError(f"unknown user {query.user_id!r}")
        labels: np.ndarray = self._cached("communities", graph.communities)
        degree = np.asarray((graph.reach + graph.reach.T).sum(axis=1)).ravel()
        return np.where(labels == labels[member], degree, np.nan)

    def _sharing(self, users: np.ndarray, privacy: Privacy) -> np.ndarray:
        """Of these users (a bool mask), those whose activity may reach their friends (`social_proof`)."""
        idx = np.flatnonzero(users)
        allowed = np.asarray(privacy.allowed([str(u) for u in self.bundle.users.ids[idx]], ["social_proof"]),
                             dtype=bool)
        out = np.zeros_like(users)
        out[idx[allowed]] = True
        return out

    # -- retrieval -----------------------------------------------------------------------------------
    def _faiss_fetch(self, index: faiss.Index, queries: np.ndarray, mask: np.ndarray | None,
                     min_score: float | None) -> Fetch:
        bits = None if mask is None else np.packbits(mask, bitorder="little")
        allowed = self.n_users if mask is None else int(mask.sum())

        def fetch(n: int) -> tuple[np.ndarray, np.ndarray]:
            params, selector = None, None
            if bits is not None:
                selector = faiss.IDSelectorBitmap(self.n_users, faiss.swig_ptr(bits))  # kept alive for the search
                params = faiss.SearchParameters()
                params.sel = selector
            k = min(n, allowed)
            if k == 0:
                return np.zeros(0, np.int64), np.zeros(0, F32)
            if min_score is not None and n >= allowed:
                _, scores, ids = index.range_search(queries, float(min_score), params=params)
            else:
                scores, ids = index.search(queries, k, params=params)
            return merge_max(ids.ravel().astype(np.int64), scores.ravel(), n, min_score)
        return fetch

    def _dense_fetch(self, scores: np.ndarray, mask: np.ndarray | None, min_score: float | None) -> Fetch:
        keep = ~np.isnan(scores)
        if mask is not None:
            keep &= mask
        if min_score is not None:
            keep &= scores >= min_score
        idx = np.flatnonzero(keep)
        order = idx[np.lexsort((idx, -scores[idx]))]  # best first, ties by idx

        def fetch(n: int) -> tuple[np.ndarray, np.ndarray]:
            top = order[:n]
            return top.astype(np.int64), scores[top].astype(F32)
        return fetch


def merge_max(ids: np.ndarray, scores: np.ndarray, n: int, min_score: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Best score per user over several queries' results, best first, at most n (FAISS pads with -1)."""
    ok = ids >= 0
    if min_score is not None:
        ok &= scores >= min_score
    ids, scores = ids[ok], scores[ok]
    order = np.lexsort((ids, -scores))
    ids, scores = ids[order], scores[order]
    _, first = np.unique(ids, return_index=True)
    first.sort()
    return ids[first][:n], scores[first][:n].astype(F32)


def best_unique(ids: np.ndarray, scores: np.ndarray, n: int, min_score: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The n best of distinct candidates, best first (ties by id); `merge_max` without the de-duplication."""
    if min_score is not None:
        keep = scores >= min_score
        ids, scores = ids[keep], scores[keep]
    if len(ids) > n:
        top = np.argpartition(-scores, n - 1)[:n] if n > 0 else np.zeros(0, np.int64)
        ids, scores = ids[top], scores[top]
    order = np.lexsort((ids, -scores))
    return ids[order].astype(np.int64), scores[order].astype(F32)


def allowed_users(user_ids: Sequence[str], privacy: Privacy, purposes: Sequence[str]) -> np.ndarray:
    """Not erased and consenting to every purpose (serving.privacy: the event log's ledger with the store)."""
    return np.asarray(privacy.allowed(list(user_ids), purposes), dtype=bool).reshape(len(user_ids))


def take_allowed(fetch: Fetch, size: int | None, ids: np.ndarray, privacy: Privacy,
                 purposes: Sequence[str]) -> Members:
    """The first `size` candidates privacy allows (all when size is None), fetching more as needed."""
    want = size if size is not None else None
    n = (want + want // 5 + 100) if want is not None else len(ids)
    checked = np.zeros(len(ids), dtype=bool)  # by user: a larger fetch may order near-ties differently
    kept_idx: list[np.ndarray] = []
    kept_scores: list[np.ndarray] = []
    kept = 0
    while True:
        cand, scores = fetch(n)
        fetched = len(cand)
        fresh = ~checked[cand]
        cand, scores = cand[fresh], scores[fresh]
        for start in range(0, len(cand), CONSENT_CHUNK):
            part = cand[start:start + CONSENT_CHUNK]
            checked[part] = True
            ok = allowed_users(ids[part].tolist(), privacy, purposes)  # the vocabulary holds str objects
            kept_idx.append(part[ok])
            kept_scores.append(scores[start:start + CONSENT_CHUNK][ok])
            kept += int(ok.sum())
            if want is not None and kept >= want:
                break
        if (want is not None and kept >= want) or fetched < n or n >= len(ids):
            break
        n = min(n * 2, len(ids))
    user_idx = np.concatenate(kept_idx) if kept_idx else np.zeros(0, np.int64)
    member_scores = np.concatenate(kept_scores) if kept_scores else np.zeros(0, F32)
    if want is not None:
        user_idx, member_scores = user_idx[:want], member_scores[:want]
    return Members(user_idx.astype(np.int64), member_scores.astype(F32))
