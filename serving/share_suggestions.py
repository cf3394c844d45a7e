"""Share suggestions: which items a user should share and to which friends.

An item is worth suggesting when the user is likely to share it at all and when sharing it converts. People
share what they are about to buy or look at, so where the bundle has a ranker the items are the user's own
ranked feed, in its order (`ranked`: the two-stage model's best guess at their next purchases; on demo-data
it recovers 1.1-1.3x the held-out shares of the baseline, against 1.0-1.2x for the formula below, see
docs/benchmarks.md). Without a ranker, a share propensity from the user's own behaviour orders the user's
recent and bought items and their top ALS items: how recently they interacted with the item, how often they
bought it, how close it is to their taste (their ALS score) and how popular it is, weights chosen on a
validation window by `benchmarks/social_eval.py`, plus the expected conversions of sending it. Those are, for
every item either way: P(friend opens a share from this user) (the user's attributed share history, smoothed
towards the shop's rate) x P(friend buys the item) (the friend's ALS affinity, clipped to [0, 1]) over the
best friends for it; friends who already bought an item are left out for it, and an item no friend would buy
is not suggested. Numpy only.

The service suggests nothing to a user who withheld personalization or was erased, and never names a friend
who withheld `social_proof` or was erased (`serving.privacy`).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Annotated

import numpy as np
import scipy.sparse as sp
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel

from features.social import SocialGraph
from features.vocab import Vocabulary
from serving.bodies import StrictJSONRoute
from serving.deps import PrivacyDep, RequestId
from serving.merchandising import Rule
from serving.recommender import Recommender, UserContext
from serving.settings import ServingSettings
from training.bundle import Bundle

MAX_FRIENDS = 300  # strongest ties scored per request
RECENT_CANDIDATES = 50
ALS_CANDIDATES = 50
RANKED_CANDIDATES = 50  # items of the user's feed considered, best first
RECENCY_HALF_LIFE_DAYS = 7.0


@dataclass(frozen=True, slots=True)
class ShareWeights:
    """How the share propensity and the expected conversions combine into an item's rank."""

    recency: float = 1.0  # 0.5 ** (days since the user's last positive event on the item / 7)
    purchases: float = 2.0  # log(1 + times the user bought it)
    affinity: float = 0.5  # the user's own ALS score, standardised over the candidates
    popularity: float = 0.0  # log(1 + the item's buyers), standardised over the candidates
    conversions: float = 0.5  # expected conversions from the best friends, standardised over the candidates


@dataclass(frozen=True, slots=True)
class ShareInputs:
    """What suggestions read; built from a bundle, or from a past window by an evaluation.

    The social graph's first len(users) ids are `users`, so a graph idx below that is a factor row.
    """

    users: Vocabulary
    items: Vocabulary
    user_factors: np.ndarray
    item_factors: np.ndarray
    bought: sp.csr_matrix  # users x items
    recent: sp.csr_matrix  # users x items: epoch seconds of the last positive event
    graph: SocialGraph
    open_rate: np.ndarray  # per graph user: smoothed share open rate (the shop's rate for non-sharers)
    purchases: sp.csr_matrix  # users x items: purchase counts
    item_popularity: np.ndarray  # per item: distinct buyers
    now: float  # epoch seconds recency is measured back from

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "ShareInputs":
        by_user = {str(k): float(v) for k, v in bundle.user_influence["open_rate"].items()}
        prior = float(bundle.manifest.social.get("open_rate", 0.0))
        state = bundle.state
        return cls(users=bundle.users, items=bundle.items, user_factors=bundle.user_factors,
                   item_factors=bundle.item_factors, bought=bundle.bought, recent=state.pair_last,
                   graph=bundle.social_graph, open_rate=open_rates(bundle.social_graph, by_user, prior),
                   purchases=state.pair_purchases, item_popularity=state.item_buyers.astype(np.float64),
                   now=state.cutoff_seconds)


def open_rates(graph: SocialGraph, by_user: dict[str, float], prior: float) -> np.ndarray:
    """Per graph user, their smoothed open rate; `prior` where they never shared."""
    rates = np.full(graph.n_users, prior, dtype=np.float64)
    if by_user:
        codes = graph.users.indexes(list(by_user))
        values = np.fromiter(by_user.values(), dtype=np.float64, count=len(by_user))
        rates[codes[codes >= 0]] = values[codes >= 0]
    return rates


@dataclass(frozen=True, slots=True)
class SuggestedFriend:
    user_id: str
    expected_conversions: float
    affinity: float  # P(friend buys the item), from ALS


@dataclass(frozen=True, slots=True)
class SuggestedItem:
    item_id: str
    expected_conversions: float  # summed over the suggested friends
    source: str  # "feed" (the user's ranked feed), else "recent" (their own recent item) or "als" (a top item)
    friends: tuple[SuggestedFriend, ...]


@dataclass(frozen=True, slots=True)
class ShareSuggestions:
    items: tuple[SuggestedItem, ...]
    open_rate: float  # P(a friend opens this user's share)
    reason: str | None = None  # why the list is empty


def _candidate_items(inputs: ShareInputs, user_idx: int) -> tuple[np.ndarray, np.ndarray]:
    """The user's recent items (newest first), then their top ALS items; and whether each came from recency."""
    row = inputs.recent.getrow(user_idx)
    recent = row.indices[np.argsort(-row.data, kind="stable")][:RECENT_CANDIDATES]
    bought = inputs.purchases.getrow(user_idx).indices
    own = np.unique(np.concatenate([recent, bought])).astype(np.int64)
    scores = inputs.item_factors @ inputs.user_factors[user_idx]
    k = min(ALS_CANDIDATES, len(scores))
    top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, np.int64)
    top = top[np.argsort(-scores[top], kind="stable")]
    items = np.concatenate([own, top[~np.isin(top, own)]]).astype(np.int64)
    return items, np.arange(len(items)) < len(own)


def _standard(values: np.ndarray) -> np.ndarray:
    spread = float(values.std())
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def share_propensity(inputs: ShareInputs, user_idx: int, items: np.ndarray, weights: ShareWeights) -> np.ndarray:
    """How likely the user is to share each item, on a relative scale (see ShareWeights)."""
    last = np.asarray(inputs.recent[user_idx, items].todense(), dtype=np.float64).ravel()
    days = np.where(last > 0, (inputs.now - last) / 86_400.0, np.inf)
    recency = np.power(0.5, np.clip(days, 0.0, None) / RECENCY_HALF_LIFE_DAYS)
    bought = np.log1p(np.asarray(inputs.purchases[user_idx, items].todense(), dtype=np.float64).ravel())
    affinity = _standard(inputs.item_factors[items] @ inputs.user_factors[user_idx])
    popularity = _standard(np.log1p(inputs.item_popularity[items]))
    propensity: np.ndarray = (weights.recency * recency + weights.purchases * bought
                              + weights.affinity * affinity + weights.popularity * popularity)
    return propensity


def _friends(inputs: ShareInputs, user_idx: int) -> np.ndarray:
    """Whom the user reaches and who has a factor row, strongest ties first, at most MAX_FRIENDS."""
    reach, weight = inputs.graph.reach(user_idx)
    keep = (reach < len(inputs.users)) & (reach != user_idx)
    reach, weight = reach[keep], weight[keep]
    order = np.argsort(-weight, kind="stable")[:MAX_FRIENDS]
    friends: np.ndarray = reach[order].astype(np.int64)
    return friends


def suggest_shares(inputs: ShareInputs, user_idx: int | None, n: int = 10, friends_per_item: int = 3,
                   weights: ShareWeights = ShareWeights(),
                   visible: Callable[[list[str]], list[bool]] | None = None,
                   ranked: Callable[[], np.ndarray] | None = None) -> ShareSuggestions:
    """The `n` best items, each with its best friends: in the order `ranked` gives (item indexes, the user's
    feed, best first; asked only once the user and some visible friend are known) when it gives any, else by
    share propensity and expected conversions. `visible` says which friends may be suggested (all when None)."""
    if user_idx is None or user_idx >= len(inputs.users):
        return ShareSuggestions((), 0.0, "unknown user: no history or social ties in the model")
    open_rate = float(inputs.open_rate[user_idx])
    friends = _friends(inputs, user_idx)
    if visible is not None and len(friends):
        friends = friends[np.asarray(visible([inputs.users.id_of(int(f)) for f in friends]), dtype=bool)]
    if len(friends) == 0:
        return ShareSuggestions((), open_rate, "no friends or followers in the social graph")
    feed = (ranked() if ranked is not None else np.zeros(0))[:RANKED_CANDIDATES].astype(np.int64)
    from_feed = len(feed) > 0
    items, from_recent = (feed, np.zeros(len(feed), bool)) if from_feed else _candidate_items(inputs, user_idx)
    if len(items) == 0:
        return ShareSuggestions((), open_rate, "no candidate items")
    affinity = np.clip(inputs.user_factors[friends] @ inputs.item_factors[items].T, 0.0, 1.0)
    owned = inputs.bought[friends][:, items].toarray() > 0
    affinity[owned] = 0.0
    per = min(friends_per_item, len(friends))
    best = np.argsort(-affinity, axis=0, kind="stable")[:per]  # per item, its best friends
    best_affinity = np.take_along_axis(affinity, best, axis=0)
    value = open_rate * best_affinity.sum(axis=0)
    if from_feed:
        order = [int(j) for j in np.flatnonzero(value > 0)[:n]]
    else:
        rank = share_propensity(inputs, user_idx, items, weights) + weights.conversions * _standard(value)
        order = [int(j) for j in np.argsort(-rank, kind="stable")[:n] if value[j] > 0]
    out = []
    for j in order:
        chosen = [(int(friends[best[r, j]]), float(best_affinity[r, j])) for r in range(per) if best_affinity[r, j] > 0]
        out.append(SuggestedItem(
            item_id=inputs.items.id_of(int(items[j])), expected_conversions=float(value[j]),
            source="feed" if from_feed else "recent" if from_recent[j] else "als",
            friends=tuple(SuggestedFriend(inputs.users.id_of(f), open_rate * a, a) for f, a in chosen),
        ))
    reason = None if out else "every friend already has the candidate items, or none fits them"
    return ShareSuggestions(tuple(out), open_rate, reason)


class FriendOut(BaseModel):
    user_id: str
    expected_conversions: float
    affinity: float


class ShareItemOut(BaseModel):
    item_id: str
    expected_conversions: float
    source: str
    friends: list[FriendOut]


class ShareSuggestionsOut(BaseModel):
    request_id: str
    bundle_version: str
    user_id: str
    open_rate: float
    items: list[ShareItemOut]
    reason: str | None = None


def ranked_feed(recommender: Recommender, user_id: str, inputs: ShareInputs, context: UserContext | None = None,
                rules: Sequence[Rule] = ()) -> np.ndarray:
    """The user's feed (merchandising rules applied: a banned item is never suggested) as item indexes of
    `inputs`, best first, when the bundle's ranker ordered it; else empty."""
    result = recommender.feed(user_id, RANKED_CANDIDATES, context=context, rules=rules, share_seats=False)
    if not result.ranked:
        return np.zeros(0, dtype=np.int64)
    codes: np.ndarray = inputs.items.indexes([i.item_id for i in result.items])
    return codes[codes >= 0]


def _inputs(request: Request) -> tuple[Bundle, ShareInputs, Recommender | None]:
    """The served bundle, its share inputs (built on first use and kept on app.state) and the recommender
    that ranks feeds (None when the app holds a bare bundle: the formula then orders the items)."""
    recommender = getattr(request.app.state, "recommender", None)
    if recommender is None:
        raise HTTPException(status_code=503, detail="no model bundle is loaded")
    bundle: Bundle = recommender.bundle
    cached = getattr(request.app.state, "share_inputs", None)
    if cached is None or cached[0] is not bundle:
        cached = (bundle, ShareInputs.from_bundle(bundle))
        request.app.state.share_inputs = cached
    return bundle, cached[1], recommender if isinstance(recommender, Recommender) else None


InputsDep = Annotated[tuple[Bundle, ShareInputs, Recommender | None], Depends(_inputs)]
UserIdPath = Annotated[str, Path(min_length=1, max_length=256)]


def share_router(settings: ServingSettings) -> APIRouter:
    """GET /v1/users/{user_id}/share-suggestions; `settings.max_n` bounds the list."""
    router = APIRouter(tags=["social"], route_class=StrictJSONRoute)
    N = Annotated[int, Query(ge=1, le=settings.max_n)]
    PerItem = Annotated[int, Query(ge=1, le=50)]

    @router.get("/v1/users/{user_id}/share-suggestions", response_model=ShareSuggestionsOut,
                response_model_exclude_none=True)
    def share_suggestions(user_id: UserIdPath, loaded: InputsDep, privacy: PrivacyDep, request_id: RequestId,
                          request: Request, n: N = 10, friends_per_item: PerItem = 3) -> ShareSuggestionsOut:
        bundle, inputs, recommender = loaded
        if privacy.standing(user_id).allows(["personalization"]):
            service = getattr(request.app.state, "service", None)  # online context and rules, as a feed reads

            def ranked(feeds: Recommender) -> np.ndarray:
                if service is None:
                    return ranked_feed(feeds, user_id, inputs)
                return ranked_feed(feeds, user_id, inputs, service.user_view(user_id).context,
                                   service.merchandising(feeds))

            found = suggest_shares(inputs, inputs.users.index_of(user_id), n, friends_per_item,
                                   visible=lambda ids: privacy.allowed(ids, ["social_proof"]),
                                   ranked=partial(ranked, recommender) if recommender is not None else None)
        else:
            found = ShareSuggestions((), 0.0, "no suggestions: personalization withheld or the user erased")
        items = [ShareItemOut(item_id=i.item_id, expected_conversions=i.expected_conversions, source=i.source,
                              friends=[FriendOut(user_id=f.user_id, expected_conversions=f.expected_conversions,
                                                 affinity=f.affinity) for f in i.friends])
                 for i in found.items]
        return ShareSuggestionsOut(request_id=request_id, bundle_version=bundle.version, user_id=user_id,
                                   open_rate=found.open_rate, items=items, reason=found.reason)

    return router
