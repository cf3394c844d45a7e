"""Answering feeds from a loaded bundle: candidates from every source (ALS through FAISS), ranked by the
LightGBM ranker with the bundle's feature state, then the fallback chain.

Batch `sharefeed recommend` and the HTTP feed both call `Recommender.feed`, so a user with no events
since training gets the same items from either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import faiss
import numpy as np
import scipy.sparse as sp

from features.candidates import (
    SOURCE_ORDER,
    CandidateModels,
    PopularLists,
    candidate_features,
    merge_candidates,
    neighbour_candidates,
    top_scores,
    user_candidates,
)
from features.feed import Candidates, Feed, Source, interleave
from features.foldin import FoldIn
from features.online_view import SocialUpdates, blank_user_rows, user_view
from features.repurchase import NO_CATEGORY
from features.served import (
    FUSION_DEPTH,
    ITEM_WEIGHT_PIPELINES,
    Pipeline,
    fallback_steps,
    final_list,
    fuse,
    history_of,
    personal_step,
    seen_items,
)
from features.social_state import OnlineCells
from features.state import FeatureState
from features.store import OnlineEvent
from features.vocab import Vocabulary
from serving.catalog import Catalog
from serving.merchandising import Ranked, Rule, apply_rules, diversify
from serving.social_proof import SocialProof
from training.bundle import Bundle
from training.index import index_like
from training.ranker import Ranker

FALLBACK_DEPTH = 2000  # how far down the trending and popular lists a feed may reach
FRIENDS_READ_ONLINE = 200  # friends whose purchases since the bundle a request reads from the online store
RETRIEVAL_MARGIN = 32  # over-fetch beyond n + blocked items, so filters rarely leave a feed short
FRESH_SHARE = 0.1  # up to this share of a feed goes to new catalog items no model has seen ...
FRESH_EVERY = 5  # ... one at every fifth place
TOP_FAVOURITES = 3  # categories a user's fresh items may come from
RULES_RESERVE = 1  # extra feed lengths fetched before rules and diversity reorder and cut
DIVERSITY_RESERVE = 4  # with a category cap: a head of few categories needs more items to choose from
RECENT_ANCHORS = 20  # recent items a pick may be explained by
SESSION_SECONDS = 30 * 60  # events this close to the user's latest one make up the current session
SESSION_EVERY = 3  # one seat in three of a feed goes to items like the ones of the current session ...
SESSION_SHARE = 1 / 3  # ... up to this share of the feed
SESSION_NEW_ITEMS = 3  # new catalog items of a session whose content neighbours are looked up
SHARED_SECONDS = 72 * 3600  # a share this recent (to the newest event seen) is fresh news for its recipient ...
SHARED_SHARE = 0.1  # ... and takes a seat at the top of the feed, up to this share of it (one at least)
# sources whose picks are explained by a similar past item
_HISTORY_SOURCES = frozenset({Source.ALS, Source.BPR, Source.ITEM_KNN, Source.EASE, Source.FOLD_IN,
                              Source.NEIGHBOURS})


@dataclass(frozen=True, slots=True)
class FeedItem:
    item_id: str
    score: float
    source: Source
    reason: str


@dataclass(frozen=True, slots=True)
class UserContext:
    """What the online store knows about a user beyond the bundle."""

    recent: Sequence[OnlineEvent] = ()  # newest first
    purchased: Mapping[str, float] = field(default_factory=dict)  # item id -> time of the last purchase
    shared_to: Sequence[OnlineEvent] = ()  # shares to the user (user_id: the sharer), newest first
    friends_purchased: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # friend -> their purchases
    referred_by: Mapping[str, float] = field(default_factory=dict)  # referrer -> the user's last event through them
    friends_shared: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # friend -> items they shared


def newer_than(shared_to: Sequence[OnlineEvent], friends_purchased: Mapping[str, Mapping[str, float]], since: float,
               ) -> tuple[list[OnlineEvent], dict[str, dict[str, float]]]:
    """The shares to a user and their friends' purchases at or after `since` (the bundle's end): what the
    bundle does not hold yet."""
    return [e for e in shared_to if e.ts >= since], newer_activity(friends_purchased, since)


def newer_activity(activity: Mapping[str, Mapping[str, float]], since: float) -> dict[str, dict[str, float]]:
    """Per person, the items they bought (or shared) at or after `since`; people with none are left out."""
    return {person: fresh for person, items in activity.items()
            if (fresh := {item: ts for item, ts in items.items() if ts >= since})}


def new_ties(shared_to: Sequence[OnlineEvent], referred_by: Mapping[str, float], since: float) -> list[str]:
    """The people a user sees since `since` (the bundle's end), once each: who shared with them, then through
    whose referral they came. The graph a training builds holds these ties (sharer -> recipient, referrer ->
    referred user); the bundle's does not yet."""
    return list(dict.fromkeys([*(e.user_id for e in shared_to if e.ts >= since),
                               *(referrer for referrer, ts in referred_by.items() if ts >= since)]))


def unread(ties: Sequence[str], read: Sequence[str], known: Vocabulary) -> list[str]:
    """The `ties` the bundle knows whose purchases were not `read` with the user's strongest ties: whose
    purchases since the bundle the online store is asked for apart."""
    skip = set(read)
    return [t for t in ties if t not in skip and t in known]


@dataclass(frozen=True, slots=True)
class _Profile:
    """The user as the ranker sees them: a state row, the factor models' user rows, the ALS vector."""

    state: FeatureState
    models: CandidateModels
    row: int
    vector: np.ndarray  # 1 x factors
    online: bool  # folded in from events the bundle has not seen
    bundle_row: int | None = None  # the user's row in the bundle (a one-user view's `row` is 0)


@dataclass(frozen=True, slots=True)
class FeedResult:
    user_id: str
    items: tuple[FeedItem, ...]
    personalized: bool
    step: Source | None
    ranked: int = 0  # candidates the ranker scored for this answer


class Recommender:
    """Read-only after construction, so one instance serves concurrent requests."""

    def __init__(self, bundle: Bundle) -> None:
        # A reload builds indexes in a thread of a worker that goes on serving: FAISS (OpenMP) on this thread
        # only, so a build does not take the core the other worker's requests run on.
        faiss.omp_set_num_threads(1)
        self.bundle = bundle
        self.catalog = Catalog(bundle)  # the bundle's item data with the catalog API's changes laid over it
        self._category = self.catalog.category  # arrays the catalog updates in place
        self._price = self.catalog.price
        policy = bundle.manifest.repurchase
        self._once_only = ~policy.repeatable_mask(self._category)
        pop = bundle.popularity
        self._fallback = fallback_steps(pop.trending, pop.popular, FALLBACK_DEPTH, Pipeline(
            bundle.manifest.served.pipeline))
        norms = np.linalg.norm(bundle.item_factors, axis=1, keepdims=True)
        self._unit_items = bundle.item_factors / np.maximum(norms, 1e-12)
        self._ranker = Ranker.from_string(bundle.ranker_text) if bundle.ranker_text else None
        served = bundle.manifest.served
        self.pipeline = Pipeline(served.pipeline)
        self._exclude_seen = served.exclude_seen
        self._repeatable = ~self._once_only
        self._lists = PopularLists.from_state(bundle.state)
        self._k = {Source(name): int(k) for name, k in bundle.manifest.candidates.items()}
        model = bundle.manifest.model
        self._fold = FoldIn(bundle.item_factors, bundle.item_gram, model.regularization, model.alpha,
                            model.confidence_scale)
        self._blank = blank_user_rows(bundle.state, bundle.manifest.categories, bundle.manifest.brands)
        self._weights = dict(bundle.manifest.event_weights)
        self.social = SocialProof(bundle)
        self._bpr_index = index_like(bundle.index, bundle.models.bpr_items)  # BPR's own, as the bundle's ALS one
        if hasattr(bundle.index, "hnsw"):
            bundle.index.hnsw.efSearch = model.ef_search

    @property
    def version(self) -> str:
        return self.bundle.version

    def category_of(self, item_id: str) -> str | None:
        return self.catalog.category_of(item_id)

    def _blocked(self, user_idx: int | None, context: UserContext | None, exclude: Sequence[str],
                 category: str | None, price_range: tuple[float | None, float | None]) -> np.ndarray:
        mask = ~self.catalog.in_stock
        if user_idx is not None:
            bought = self.bundle.bought
            items = bought.indices[bought.indptr[user_idx] : bought.indptr[user_idx + 1]]
            mask[items[self._once_only[items]]] = True
        if context is not None and context.purchased:  # bought since training, seconds ago included
            codes = self.bundle.items.indexes(list(context.purchased))
            codes = codes[codes >= 0]
            mask[codes[self._once_only[codes]]] = True
        if exclude:
            codes = self.bundle.items.indexes(list(exclude))
            mask[codes[codes >= 0]] = True
        if category is not None:
            mask |= self._category != category
        low, high = price_range
        if low is not None or high is not None:
            with np.errstate(invalid="ignore"):
                outside = np.isnan(self._price)
                if low is not None:
                    outside |= self._price < low
                if high is not None:
                    outside |= self._price > high
            mask |= outside
        return mask

    def _retrieve(self, vector: np.ndarray, n: int, blocked: np.ndarray, category: str | None) -> Candidates:
        if category is not None:
            members = self.catalog.members(category)
            scores = self.bundle.item_factors[members] @ vector[0]
            order = np.argsort(-scores, kind="stable")
            return Candidates(Source.ALS, members[order], scores[order])
        items, scores = _search(self.bundle.index, vector, n, blocked)
        return Candidates(Source.ALS, items, scores)

    def _profile(self, user_idx: int | None, context: UserContext | None) -> _Profile | None:
        """The bundle's rows for a known user, updated by (or, for a new user, built from) the events
        the online store holds since the bundle's data ended; None when there is nothing to go on."""
        state, models = self.bundle.state, self.bundle.models
        fresh = [e for e in (context.recent if context else ()) if e.ts >= state.cutoff_seconds]
        social = self._social_updates(context) if context and (user_idx is not None or fresh) else None
        if not fresh and social is None:
            if user_idx is None:
                return None
            return _Profile(state, models, user_idx, self.bundle.user_factors[user_idx : user_idx + 1], False,
                            user_idx)
        items = self.bundle.items.indexes([e.item_id for e in fresh])
        view = user_view(state, -1 if user_idx is None else user_idx, self._blank, items,
                         np.asarray([e.event_type for e in fresh], dtype=object),
                         np.asarray([e.ts for e in fresh], dtype=np.float64), self._weights, social)
        # Only the user's own new events refold their vector and make the profile online (session, fold-in);
        # what friends did reaches the feature rows alone.
        vector = self._fold.user_vector(view.pair_weight.indices, view.pair_weight.data) if fresh else None
        if vector is None:
            if user_idx is None:
                return None
            vector = self.bundle.user_factors[user_idx]
        bpr = (models.bpr_users[user_idx : user_idx + 1] if user_idx is not None
               else np.full((1, models.bpr_users.shape[1]), np.nan, dtype=np.float32))
        view_models = CandidateModels(vector[None, :], models.als_items, bpr, models.bpr_items,
                                      models.item_neighbours)
        return _Profile(view, view_models, 0, vector[None, :], bool(fresh), user_idx)

    def friend_ids(self, user_id: str) -> list[str]:
        """The people the user sees, strongest ties first (at most FRIENDS_READ_ONLINE): whose purchases
        since the bundle the online store is asked for."""
        return self.social.strongest_ties(user_id, FRIENDS_READ_ONLINE)

    def _social_updates(self, context: UserContext) -> SocialUpdates | None:
        """What reached the user from others after the bundle's data, in its indexes: shares to them, their
        friends' purchases and shares, their new ties; None when there is nothing."""
        users, items = self.bundle.users, self.bundle.items
        since = self.bundle.state.cutoff_seconds
        newer, newer_bought = newer_than(context.shared_to, context.friends_purchased, since)
        shares = [e for e in newer if e.item_id in items]

        def cells(activity: Mapping[str, Mapping[str, float]]) -> OnlineCells:
            done = [(person, item, ts) for person, items_done in activity.items() if person in users
                    for item, ts in items_done.items() if item in items]
            return OnlineCells(users.indexes([person for person, _, _ in done]),
                               items.indexes([item for _, item, _ in done]),
                               np.asarray([ts for _, _, ts in done], dtype=np.float64))

        bought, their_shares = cells(newer_bought), cells(newer_activity(context.friends_shared, since))
        ties = users.indexes(new_ties(newer, context.referred_by, since))
        ties = ties[ties >= 0]
        if not shares and not len(bought.person) and not len(their_shares.person) and not len(ties):
            return None
        return SocialUpdates(
            share_items=items.indexes([e.item_id for e in shares]),
            sharers=users.indexes([e.user_id for e in shares]),
            share_ts=np.asarray([e.ts for e in shares], dtype=np.float64),
            friends=bought.person,
            friend_items=bought.col,
            friend_ts=bought.value,
            ties=ties,
            friend_shares=their_shares,
        )

    def _rank(self, profile: _Profile, blocked: np.ndarray, category: str | None) -> Candidates:
        """Every source's candidates for the user, merged and ordered by the ranker."""
        assert self._ranker is not None
        state, models, row = profile.state, profile.models, profile.row
        als = self._retrieve(profile.vector, self._k[Source.ALS], blocked, category)
        factor_lists = {Source.ALS: self._factor_top(als, self._k[Source.ALS], blocked)}
        bpr_user = models.bpr_users[row]
        if np.isfinite(bpr_user).all():
            found, values = _search(self._bpr_index, bpr_user[None, :].astype(np.float32), self._k[Source.BPR],
                                    blocked)
            keep = ~blocked[found]
            factor_lists[Source.BPR] = found[keep][: self._k[Source.BPR]], values[keep][: self._k[Source.BPR]]
        lists = user_candidates(state, models, self._lists, row, self._k, blocked, factor_lists)
        items, scores, ranks, first, _ = merge_candidates(lists, self.bundle.manifest.union_size)
        chain_source = Source.FOLD_IN if profile.online else Source.ALS
        if not len(items):
            return Candidates(chain_source, items, np.empty(0, dtype=np.float32))
        rows = np.full(len(items), row, dtype=np.int64)
        predicted = self._ranker.predict(candidate_features(state, models, rows, items, scores, ranks))
        order = np.argsort(-predicted, kind="stable")
        return Candidates(chain_source, items[order], predicted[order].astype(np.float32),
                          tuple(SOURCE_ORDER[i] for i in first[order].tolist()))

    def _fused(self, profile: _Profile, blocked: np.ndarray) -> Candidates | None:
        """The served blend: each part's best FUSION_DEPTH items (ALS scored exactly, as evaluation did)."""
        served = self.bundle.manifest.served
        popularity = {Pipeline.TRENDING: self.bundle.popularity.trending,
                      Pipeline.POPULAR: self.bundle.popularity.popular}
        history = history_of(profile.state.pair_weight, profile.row)
        parts = [personal_step(Pipeline(kind), FUSION_DEPTH, blocked, user_vector=profile.vector[0],
                               item_factors=self.bundle.item_factors, item_weights=self.bundle.item_weights,
                               history=history, popularity=popularity.get(Pipeline(kind)))
                 for kind in served.parts]
        return fuse(parts, served.weights, FUSION_DEPTH)

    def _seen(self, profile: _Profile, user_idx: int | None, context: UserContext | None) -> np.ndarray:
        """Items the user interacted with that the served pipeline keeps out of their list (repeat buys aside)."""
        history = history_of(profile.state.pair_weight, profile.row)[0]
        if user_idx is not None:  # the bundle's history too: an online view holds only the new events
            history = np.union1d(history, history_of(self.bundle.state.pair_weight, user_idx)[0])
        bought = np.empty(0, dtype=np.int64)
        if user_idx is not None:
            b = self.bundle.bought
            bought = b.indices[b.indptr[user_idx] : b.indptr[user_idx + 1]].astype(np.int64)
        if context is not None and context.purchased:
            codes = self.bundle.items.indexes(list(context.purchased))
            bought = np.union1d(bought, codes[codes >= 0])
        return seen_items(history.astype(np.int64), bought, self._repeatable)

    @staticmethod
    def _factor_top(retrieved: Candidates, k: int, blocked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = ~blocked[retrieved.items]
        return retrieved.items[keep][:k], retrieved.scores[keep][:k]

    def _session(self, context: UserContext | None, blocked: np.ndarray) -> Candidates | None:
        """Items like the ones of the user's current session (their events within SESSION_SECONDS of the
        latest): the bundle's item neighbours of those items, else the nearest items by cosine; for new
        catalog items the model has not seen, their content neighbours (category, brand, price)."""
        if context is None or not context.recent:
            return None
        latest = max(e.ts for e in context.recent)
        picked = [e for e in context.recent
                  if e.ts >= latest - SESSION_SECONDS and self._weights.get(e.event_type, 0.0) > 0]
        codes = self.bundle.items.indexes([e.item_id for e in picked])
        weights = np.asarray([self._weights[e.event_type] for e in picked], dtype=np.float64)
        known = codes >= 0
        scores = np.zeros(len(blocked), dtype=np.float64)
        if known.any():
            rows = self.bundle.models.item_neighbours[codes[known]]  # the session's rows only: cheap at any size
            scores += np.asarray((sp.csr_matrix(weights[known][None, :]) @ rows).todense()).ravel()
            if not (scores > 0).any():
                direction = (self._unit_items[codes[known]] * weights[known][:, None]).sum(axis=0)
                scores = np.maximum(self._unit_items @ direction, 0.0)
        unseen = [e.item_id for e, k in zip(picked, known.tolist(), strict=True) if not k]
        for item_id in list(dict.fromkeys(unseen))[:SESSION_NEW_ITEMS]:
            for neighbour, score in self.catalog.content_neighbours(item_id, RETRIEVAL_MARGIN):
                idx = self.bundle.items.index_of(neighbour)
                if idx is not None:
                    scores[idx] += score
        scores[codes[known]] = -np.inf  # the session's own items are not news
        positive = np.flatnonzero(scores > 0)  # only these can be picked: no pass over the whole catalog
        chosen, values = top_scores(scores[positive].astype(np.float32), RETRIEVAL_MARGIN, blocked, positive)
        return Candidates(Source.NEIGHBOURS, chosen, values) if len(chosen) else None

    def _shared_news(self, context: UserContext | None, blocked: np.ndarray, seats: int, now: datetime
                     ) -> Candidates | None:
        """Up to `seats` items shared to the user since the bundle and within SHARED_SECONDS before `now`,
        newest first, one per sharer (nobody fills the seats alone), not blocked: a friend's pick the user
        has not had the time to open yet."""
        if context is None or not context.shared_to:
            return None
        since = max(self.bundle.state.cutoff_seconds, now.timestamp() - SHARED_SECONDS)
        newest_first = sorted((e for e in context.shared_to if e.ts >= since), key=lambda e: -e.ts)
        per_sharer: dict[str, str] = {}  # each sharer's newest share
        for e in newest_first:
            per_sharer.setdefault(e.user_id, e.item_id)
        codes = self.bundle.items.indexes(list(dict.fromkeys(per_sharer.values())))
        codes = codes[codes >= 0]
        codes = codes[~blocked[codes]][:seats]
        if not len(codes):
            return None
        return Candidates(Source.SHARED, codes, np.linspace(1.0, 0.5, len(codes), dtype=np.float32))

    def _category_trending(self, category: str) -> Candidates:
        members = self.catalog.members(category)
        trending = self.bundle.popularity.trending[members]
        popular = self.bundle.popularity.popular[members]
        order = np.lexsort((members, -popular, -trending))
        chosen = members[order][:FALLBACK_DEPTH]
        return Candidates(Source.TRENDING_CATEGORY, chosen, trending[order][:FALLBACK_DEPTH])

    def feed(self, user_id: str, n: int, *, category: str | None = None, exclude: Sequence[str] = (),
             personalized: bool = True, context: UserContext | None = None,
             price_range: tuple[float | None, float | None] = (None, None), rules: Sequence[Rule] = (),
             diversity: tuple[int, int] | None = None, now: datetime | None = None,
             share_seats: bool = True) -> FeedResult:
        """The user's feed: ranked candidates, then the fallback chain, with every filter applied.

        `personalized=False` (the caller's choice or the user's withheld consent) answers from the
        non-personal steps only and reads nothing about the user. `share_seats=False` leaves fresh shares
        to the ranker alone (share suggestions: what the user would pass on, not what was just sent to them).
        """
        if not personalized:
            user_idx, context = None, None
        else:
            user_idx = self.bundle.users.index_of(user_id)
        blocked = self._blocked(user_idx, context, exclude, category, price_range)
        profile = self._profile(user_idx, context)
        if profile is not None and self._exclude_seen:
            blocked[self._seen(profile, user_idx, context)] = True
        chain: list[Candidates] = []
        ranked = 0
        if profile is not None and self._ranker is not None and self.pipeline is Pipeline.RANKER:
            chain.append(self._rank(profile, blocked, category))
            ranked = len(chain[0].items)
        elif profile is not None and self.pipeline in ITEM_WEIGHT_PIPELINES:
            single = personal_step(self.pipeline, (DIVERSITY_RESERVE + 2) * n, blocked,
                                   item_weights=self.bundle.item_weights,
                                   history=history_of(profile.state.pair_weight, profile.row))
            if single is not None:
                chain.append(single)
        elif profile is not None and self.pipeline is Pipeline.FUSED:
            fused = self._fused(profile, blocked)
            if fused is not None:
                chain.append(fused)
        elif profile is not None and self.pipeline is not Pipeline.TRENDING and self.pipeline is not Pipeline.POPULAR:
            retrieved = self._retrieve(profile.vector, n, blocked, category)
            chain.append(Candidates(Source.FOLD_IN if profile.online else Source.ALS, retrieved.items,
                                    retrieved.scores))
        reserve = (DIVERSITY_RESERVE if diversity else RULES_RESERVE if rules else 0) * n  # bans, buries, caps
        fresh_session = profile is None or profile.online  # events the bundle has not seen
        session = self._session(context, blocked) if fresh_session else None
        if session is not None and chain:
            seats = int(n * SESSION_SHARE)
            # the feed reads at most n + reserve items of the interleaved list; a ranked item may be skipped
            # there as a repeat of a session pick, at most `seats` times: a prefix of the ranking is enough
            chain[0] = interleave(_head(chain[0], n + reserve + seats, blocked), session, SESSION_EVERY, seats)
        elif session is not None:  # only items the model has not seen yet: their neighbours lead
            chain.append(session)
        when = now or datetime.now(UTC)
        shared = self._shared_news(context, blocked, max(1, int(n * SHARED_SHARE)), when) if share_seats else None
        if shared is not None:
            chain.insert(0, shared)  # the feed takes these first, then the rest without repeating them
        if profile is not None and profile.online:
            chain.append(Candidates(Source.NEIGHBOURS, *neighbour_candidates(
                profile.state, self.bundle.models.item_neighbours, 0, FALLBACK_DEPTH, blocked)))
        if category is not None:
            chain.append(self._category_trending(category))
        feed = final_list(chain, self._fallback, n + reserve, blocked)
        main = next((s for s in feed.steps if s != Source.SHARED), feed.step)  # the seats are not the step
        step = Source.FOLD_IN if profile is not None and profile.online and len(feed.items) else main
        items = self._items(feed, profile)
        fresh = self._fresh(profile, category, exclude, price_range, n)
        if fresh:
            items = _placed(items, fresh, FRESH_EVERY)
        if rules or diversity:
            items = self._merchandise(items, n, blocked, rules, diversity, when)
        return FeedResult(user_id, items[:n], profile is not None or session is not None, step, ranked)

    def _fresh(self, profile: _Profile | None, category: str | None, exclude: Sequence[str],
               price_range: tuple[float | None, float | None], n: int) -> tuple[FeedItem, ...]:
        """New catalog items no model has seen yet (freshness boost): in stock, newest first, in the requested
        category or else in the user's favourite ones, within the filters; at most FRESH_SHARE of a feed."""
        slots = int(n * FRESH_SHARE)
        if not slots or not self.catalog.new_items:
            return ()
        wanted: set[str] | None = {category} if category is not None else self._favourites(profile)
        low, high = price_range
        excluded = set(exclude)
        picked: list[FeedItem] = []
        for meta in self.catalog.fresh_items(FALLBACK_DEPTH, category):
            if meta.item_id in excluded or (wanted is not None and meta.category not in wanted):
                continue
            if (low is not None or high is not None) and (
                    meta.price is None or (low is not None and meta.price < low)
                    or (high is not None and meta.price > high)):
                continue
            reason = f"new in {meta.category}" if meta.category != NO_CATEGORY else "new arrival"
            picked.append(FeedItem(meta.item_id, 0.0, Source.NEW_ARRIVALS, reason))
            if len(picked) == slots:
                break
        return tuple(picked)

    def _favourites(self, profile: _Profile | None) -> set[str] | None:
        """The user's top categories by affinity; None (any category) without a profile."""
        if profile is None:
            return None
        affinity = profile.state.user_category
        row = affinity[profile.row]
        names = self.bundle.manifest.categories
        top = row.indices[np.argsort(-row.data)[:TOP_FAVOURITES]]
        return {names[c] for c in top.tolist() if c < len(names)} or None

    def _merchandise(self, items: tuple[FeedItem, ...], n: int, blocked: np.ndarray, rules: Sequence[Rule],
                     diversity: tuple[int, int] | None, now: datetime) -> tuple[FeedItem, ...]:
        """The shop's rules (ban, bury, boost, pin) and the category cap, over the ranked items."""
        by_id = {item.item_id: item for item in items}

        def eligible(item_id: str) -> bool:  # may a pin show an item the ranking did not propose?
            idx = self.bundle.items.index_of(item_id)
            return self.catalog.available(item_id) if idx is None else not blocked[idx]

        ranked = Ranked(tuple(by_id), tuple(i.score for i in items), tuple(i.source.value for i in items))
        if rules:
            ranked = apply_rules(ranked.items, ranked.scores, ranked.sources, self.catalog.category_of, rules,
                                 len(ranked.items), now, eligible=eligible)
        if diversity is not None:
            most, window = diversity
            order = diversify(ranked.items, [self.catalog.category_of(i) for i in ranked.items], most, window,
                              locked=[s == Source.PINNED for s in ranked.sources])
            ranked = ranked.reorder(order)
        out: list[FeedItem] = []
        for item_id, score, source in zip(ranked.items, ranked.scores, ranked.sources, strict=True):
            kept = by_id.get(item_id)
            if source == Source.PINNED:
                out.append(FeedItem(item_id, score, Source.PINNED, "featured by the shop"))
            elif kept is not None:
                out.append(FeedItem(item_id, score, kept.source, kept.reason))
        return tuple(out[:n])

    def rank(self, user_id: str, item_ids: Sequence[str], *, context: UserContext | None = None,
             personalized: bool = True) -> FeedResult:
        """The caller's items in the order the ranker prefers for this user (no filter drops any).

        Without a profile (unknown user, no events, or no consent) the order is by trending; items the
        bundle does not know keep their given order at the end with score 0.
        """
        unique = list(dict.fromkeys(item_ids))
        codes = self.bundle.items.indexes(unique)
        known = codes >= 0
        items = codes[known]
        user_idx = self.bundle.users.index_of(user_id) if personalized else None
        profile = self._profile(user_idx, context) if personalized else None
        if profile is not None and self._ranker is not None and len(items):
            rows = np.full(len(items), profile.row, dtype=np.int64)
            scores = self._ranker.predict(candidate_features(profile.state, profile.models, rows, items, {}, {}))
            source = Source.FOLD_IN if profile.online else Source.ALS
        elif profile is not None:
            scores = self.bundle.item_factors[items] @ profile.vector[0]
            source = Source.FOLD_IN if profile.online else Source.ALS
        else:
            scores = self.bundle.popularity.trending[items]
            source = Source.TRENDING
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        ranked_items = items[order]
        feed = Feed(ranked_items, np.asarray(scores, dtype=np.float32)[order], (source,) * len(ranked_items),
                    (source,) * len(ranked_items))
        picked = self._items(feed, profile)
        missing = tuple(FeedItem(item_id, 0.0, Source.POPULAR, "not in the current model")
                        for item_id, ok in zip(unique, known.tolist(), strict=True) if not ok)
        return FeedResult(user_id, picked + missing, profile is not None, source if len(items) else None)

    def _items(self, feed: Feed, profile: _Profile | None) -> tuple[FeedItem, ...]:
        ids = self.bundle.items.ids
        anchors = self._anchors(feed, profile)
        return tuple(
            FeedItem(str(ids[idx]), float(score), source, self._reason(source, idx, anchors.get(idx)))
            for idx, score, source in zip(feed.items.tolist(), feed.scores.tolist(), feed.sources, strict=True)
        )

    def _anchors(self, feed: Feed, profile: _Profile | None) -> dict[int, int]:
        """For each personal pick, the item of the user's recent history it is most like (cosine)."""
        if profile is None:
            return {}
        if profile.online:
            last = profile.state.pair_last
            history = last.indices[np.argsort(-last.data)[:RECENT_ANCHORS]]
        elif profile.bundle_row is not None:
            recent, row = self.bundle.recent, profile.bundle_row
            history = recent.indices[recent.indptr[row] : recent.indptr[row + 1]]
        else:
            return {}
        picks = [i for i, s in zip(feed.items.tolist(), feed.sources, strict=True) if s in _HISTORY_SOURCES]
        if not len(history) or not picks:
            return {}
        similarity = self._unit_items[picks] @ self._unit_items[history].T
        for row, pick in enumerate(picks):  # an item is not its own explanation
            similarity[row, history == pick] = -np.inf
        best = history[np.argmax(similarity, axis=1)]
        return {pick: int(anchor) for pick, anchor in zip(picks, best.tolist(), strict=True) if anchor != pick}

    def _label(self, item_idx: int) -> str:
        title = self.catalog.title[item_idx]
        return str(title) if isinstance(title, str) and title else self.bundle.items.id_of(item_idx)

    def _reason(self, source: Source, item_idx: int, anchor: int | None) -> str:
        category = self._category[item_idx]
        if source in _HISTORY_SOURCES:
            if anchor is None:
                return "picked for your taste from what you browsed and bought"
            return f"similar to {self._label(anchor)} you looked at"
        if source is Source.REPEAT:
            return "you bought this before"
        if source is Source.SHARED:
            return "shared with you by a friend"
        if source is Source.FRIENDS_BOUGHT:
            return "bought by people you follow or know"
        if source is Source.FRIENDS_TRENDING:
            return "popular among your friends lately"
        if source is Source.NEW_ARRIVALS:
            return f"new in {category}" if category else "new arrival"
        if source is Source.CATEGORY_TRENDING:
            return f"trending in {category}, a category you like" if category else "trending now"
        if source in (Source.TRENDING, Source.TRENDING_CATEGORY):
            return f"trending in {category}" if category else "trending now"
        return f"popular in {category}" if category else "popular with shoppers"


def _placed(items: tuple[FeedItem, ...], extra: tuple[FeedItem, ...], every: int) -> tuple[FeedItem, ...]:
    """`items` with `extra` placed at every `every`-th position (new items not in the ranked list)."""
    out: list[FeedItem] = []
    pending = list(extra)
    for item in items:
        if pending and len(out) % every == every - 1:
            out.append(pending.pop(0))
        out.append(item)
    return (*out, *pending)


def _head(candidates: Candidates, count: int, blocked: np.ndarray) -> Candidates:
    """The shortest prefix of `candidates` that holds `count` items not blocked (all of them if fewer)."""
    open_at = np.flatnonzero(~blocked[candidates.items])
    if len(open_at) <= count:
        return candidates
    end = int(open_at[count - 1]) + 1
    sources = candidates.item_sources[:end] if candidates.item_sources is not None else None
    return Candidates(candidates.source, candidates.items[:end], candidates.scores[:end], sources)


def _search(index: faiss.Index, vector: np.ndarray, n: int, blocked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The index's best items for `vector`, fetching deeper until `n` of them pass the filters."""
    n_items = len(blocked)
    # over-fetch by the share of items the filters let through
    open_share = max(1.0 - np.count_nonzero(blocked) / max(n_items, 1), 1e-3)
    k = min(n_items, int((n + RETRIEVAL_MARGIN) / open_share))
    while True:
        scores, items = index.search(vector, k)
        found = items[0] >= 0
        kept = int((~blocked[items[0][found]]).sum())
        if kept >= n or k >= n_items:
            return items[0][found].astype(np.int64), scores[0][found]
        k = min(n_items, k * 2)
