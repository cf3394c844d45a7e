"""The online store: what the service knows about users and items since the bundle was trained.

Everything here is keyed by external ids (dense indexes change with every bundle). Two implementations
live in `features.online`: one on a Redis server (`SHAREFEED_REDIS_URL`), shared by every worker process,
and an in-process one, the embedded default for a single worker and for unit tests of the code above it.
Redis is a projection of the durable event log (`features.eventlog`): it may be lost and rebuilt by
replaying the log, so nothing is written here that the log does not also hold, except the catalog and
merchandising overlays, which are their own source of truth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

RECENT_CAP = 50  # events kept per user, newest first
INBOX_CAP = 50  # shares to a user kept, newest first
REFERRERS_CAP = 50  # referrers a user came through kept per user, the latest
EVENT_ID_TTL_SECONDS = 7 * 86_400  # how long a seen event_id makes a retry a no-op
TRENDING_BUCKET_SECONDS = 3_600  # item counters are kept per hour ...
TRENDING_BUCKETS_KEPT = 7 * 24  # ... for a week, then expire
CONSENT_PURPOSES = ("personalization", "marketing", "social_proof")
CLAIM_TAKEOVER_SECONDS = 10.0  # a pending claim this old is taken over: far longer than a logged append takes


class ClaimOutcome(StrEnum):
    """What a pending claim of one event id found. An id is claimed *pending* (by one request, stamped with
    its owner and the time) before its batch is appended to the log, and marked *done* once the log holds it,
    so an id claimed by a process that died before the append is not taken for a duplicate."""

    NEW = "new"  # not seen before: claimed pending for the caller, who logs it
    TAKEN_OVER = "taken_over"  # pending for longer than the takeover time (its owner died): now the caller's
    DONE = "done"  # in the log already: a duplicate
    BUSY = "busy"  # pending, and recently: another request is logging it; retry shortly


@dataclass(frozen=True, slots=True)
class OnlineEvent:
    user_id: str
    item_id: str
    event_type: str
    ts: float  # epoch seconds
    category: str | None = None  # the item's category when known, for per-category trending
    target_user_id: str | None = None  # for a share: the recipient, when known
    referrer_id: str | None = None  # whose share or link brought the user here, when known


@dataclass(frozen=True, slots=True)
class UserSnapshot:
    recent: list[OnlineEvent]  # newest first
    purchased: dict[str, float]
    consent: dict[str, bool]
    erased: bool = False  # the store holds a tombstone for the user
    shared_to: list[OnlineEvent] = field(default_factory=list)  # shares to the user (user_id: the sharer), newest first
    friends_purchased: dict[str, dict[str, float]] = field(default_factory=dict)  # friend id -> their purchases
    referred_by: dict[str, float] = field(default_factory=dict)  # referrer id -> the user's last event through them
    friends_shared: dict[str, dict[str, float]] = field(default_factory=dict)  # friend id -> items they shared


class OnlineStore(Protocol):
    """Operations the service needs; each is one round trip (or one pipeline) on Redis."""

    # -- events -----------------------------------------------------------------------------------
    def claim_pending(self, event_ids: Sequence[str], owner: str,
                      takeover_seconds: float = CLAIM_TAKEOVER_SECONDS) -> list[ClaimOutcome]:
        """Claim ids about to be logged, pending for `owner` (NEW or TAKEN_OVER), unless they are done or
        pending for less than `takeover_seconds` (the store's clock); atomic per id."""
        ...

    def finish_claims(self, event_ids: Sequence[str]) -> None:
        """Mark claims done: their batch is in the log (within EVENT_ID_TTL_SECONDS a retry is a duplicate)."""
        ...

    def claim_event_ids(self, event_ids: Sequence[str]) -> list[bool]:
        """Mark ids of logged events done; True for each id that was neither pending nor done before."""
        ...

    def release_event_ids(self, event_ids: Sequence[str], owner: str) -> None:
        """Drop the pending claims `owner` still holds on these ids (their batch could not be written to the
        log, so a retry must count); a claim taken over or done since is left alone."""
        ...

    def record(self, events: Sequence[OnlineEvent]) -> None:
        """Apply accepted events: each user's recent list (capped at RECENT_CAP), purchases (a refund
        removes the item again) and shared items, per-hour item counters (global and per category) for trending, a share
        with a recipient in the recipient's inbox (capped at INBOX_CAP; not for an erased recipient), and an
        event with a referrer in the user's `referred_by` (not for an erased referrer)."""
        ...

    def recent(self, user_id: str, limit: int = RECENT_CAP) -> list[OnlineEvent]:
        """The user's latest events, newest first."""
        ...

    def purchased(self, user_id: str) -> dict[str, float]:
        """Items the user bought since the bundle's data (item id -> time of the last purchase)."""
        ...

    def snapshot(self, user_id: str, friends: Sequence[str] = ()) -> UserSnapshot:
        """`recent`, `purchased`, `consent`, the tombstone, the inbox and `referred_by` of one user, and what
        `friends` bought and shared (those with any), in one round trip (what a feed reads)."""
        ...

    def activity_of(self, user_ids: Sequence[str]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        """What several users bought and shared since the bundle's data (item id -> time of the last purchase,
        of the last share; users without any left out), in one round trip."""
        ...

    def trending(self, hours: int, n: int, category: str | None = None) -> list[tuple[str, float]]:
        """The n items with the most positive events in the last `hours` (decayed by age), best first."""
        ...

    # -- consent and erasure ----------------------------------------------------------------------
    def set_consent(self, user_id: str, purposes: Mapping[str, bool]) -> None: ...

    def consent(self, user_id: str) -> dict[str, bool]:
        """Every purpose in CONSENT_PURPOSES; a user who never said anything has given none away (True)."""
        ...

    def consents(self, user_ids: Sequence[str]) -> list[dict[str, bool]]:
        """`consent` of many users in one round trip."""
        ...

    def erase_user(self, user_id: str) -> None:
        """Drop the user's online state and keep a tombstone."""
        ...

    def erased(self, user_ids: Sequence[str]) -> list[bool]: ...

    def standings(self, user_ids: Sequence[str]) -> tuple[list[bool], list[dict[str, bool]]]:
        """`erased` and `consents` of many users together, in one round trip."""
        ...

    # -- catalog and merchandising overlays ---------------------------------------------------------
    def put_items(self, items: Sequence[Mapping[str, object]]) -> int:
        """Upsert catalog rows (item_id plus any of category, brand, price, in_stock, title, created_at);
        fields given replace the stored ones. Returns the catalog version after the write."""
        ...

    def items_since(self, version: int) -> tuple[int, list[dict[str, object]]]:
        """(current version, the merged rows of every item changed after `version`)."""
        ...

    def put_rule(self, rule_id: str, rule: Mapping[str, object]) -> int:
        """Create or replace a merchandising rule; returns the rules version after the write."""
        ...

    def delete_rule(self, rule_id: str) -> bool: ...

    def rules(self) -> tuple[int, dict[str, dict[str, object]]]:
        """(rules version, every rule by id)."""
        ...

    # -- operations -----------------------------------------------------------------------------------
    def hit(self, bucket: str, window_seconds: int) -> int:
        """Count one request in `bucket` for the current fixed window; returns the window's count so far."""
        ...

    def set_bundle_pointer(self, reference: str) -> None:
        """Name the bundle every worker should serve (a path or an MLflow alias reference)."""
        ...

    def bundle_pointer(self) -> str | None: ...

    def user_bytes(self, user_id: str) -> int:
        """Bytes the store spends on this user (Redis MEMORY USAGE of the user's keys)."""
        ...

    def ping(self) -> bool: ...

    # -- rebuilding from the event log ------------------------------------------------------------------
    def generation(self) -> str | None:
        """What the last complete build of this store from the event log wrote; None when the store lost its
        data (a Redis server restarted without persistence) or was never built."""
        ...

    def set_generation(self, value: str) -> None: ...

    def acquire_lock(self, name: str, owner: str, ttl_seconds: float) -> bool:
        """Take the named lock for `owner` unless someone else holds it; it lapses after `ttl_seconds`."""
        ...

    def release_lock(self, name: str, owner: str) -> None:
        """Give the lock back, only when `owner` still holds it."""
        ...
