"""The Redis key layout of the online store, in one place.

Keys are built from external ids (dense indexes change with every bundle). The kind of a key comes right
after the prefix and the id comes last (or just before a numeric hour), so two ids can never build the
same key whatever characters they hold. Time to live is set where the data should age out on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from features.store import EVENT_ID_TTL_SECONDS, TRENDING_BUCKET_SECONDS, TRENDING_BUCKETS_KEPT

DEFAULT_PREFIX = "sf:"

# A user's recent events and purchases age out when the user has been quiet this long (refreshed on write).
USER_TTL_SECONDS = 90 * 86_400
# An hour bucket is written during its hour (and by late events); it lives for the kept window after the
# last write, so a replay of old data keeps its buckets as long as live data would.
TRENDING_TTL_SECONDS = (TRENDING_BUCKETS_KEPT + 1) * TRENDING_BUCKET_SECONDS
CLAIM_TTL_SECONDS = EVENT_ID_TTL_SECONDS
CLOCK_MEMBER = "now"  # the one member of the clock sorted set; its score is the newest event time seen


def hour_of(ts: float) -> int:
    """The trending bucket (hours since the epoch) an event time falls in."""
    return int(ts // TRENDING_BUCKET_SECONDS)


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    # -- per user ---------------------------------------------------------------------------------
    def recent(self, user_id: str) -> str:
        """List of packed event records, newest first (by event second; RECENT_CAP kept)."""
        return f"{self.prefix}r:{user_id}"

    def purchases(self, user_id: str) -> str:
        """Hash: item id -> second of the last purchase."""
        return f"{self.prefix}p:{user_id}"

    def shared_items(self, user_id: str) -> str:
        """Hash: item id -> second of the user's last share of it (to anyone)."""
        return f"{self.prefix}sh:{user_id}"

    def inbox(self, user_id: str) -> str:
        """List of packed share records (who shared which item with the user), newest first (INBOX_CAP kept)."""
        return f"{self.inbox_prefix}{user_id}"

    @property
    def inbox_prefix(self) -> str:
        return f"{self.prefix}in:"

    def sent(self, user_id: str) -> str:
        """Set of the users who were sent a share of this user's or came through a referral of theirs (their
        inbox or referred_by may have let the record go since; scrubbed when the user is erased)."""
        return f"{self.sent_prefix}{user_id}"

    @property
    def sent_prefix(self) -> str:
        return f"{self.prefix}sn:"

    def came_from(self, user_id: str) -> str:
        """Set of the users whose share reached this user or through whose referral they came: whose sent
        sets note them, scrubbed when the user is erased (no expiry, unlike the inbox and referred_by)."""
        return f"{self.came_from_prefix}{user_id}"

    @property
    def came_from_prefix(self) -> str:
        return f"{self.prefix}cf:"

    def referred_by(self, user_id: str) -> str:
        """Hash: referrer id -> second of the user's last event through a referral of theirs."""
        return f"{self.referred_by_prefix}{user_id}"

    @property
    def referred_by_prefix(self) -> str:
        return f"{self.prefix}rf:"

    def consent(self, user_id: str) -> str:
        """Hash: purpose -> "1" / "0"; an absent purpose is consent."""
        return f"{self.prefix}c:{user_id}"

    def user_keys(self, user_id: str) -> tuple[str, ...]:
        """Every key holding this user's personal state (what an erasure deletes; their records in other
        users' inboxes are scrubbed apart)."""
        return (self.recent(user_id), self.purchases(user_id), self.shared_items(user_id), self.inbox(user_id),
                self.sent(user_id), self.referred_by(user_id), self.came_from(user_id), self.consent(user_id))

    @property
    def tombstones(self) -> str:
        """Set of erased user ids (kept without end: an erased user is never personalized again)."""
        return f"{self.prefix}erased"

    # -- events -------------------------------------------------------------------------------------
    def rate(self, bucket: str, window: int) -> str:
        """Requests counted in one fixed window of a rate limit (expires with the window)."""
        return f"{self.prefix}rl:{window}:{bucket}"

    def event_id(self, event_id: str) -> str:
        """String with CLAIM_TTL_SECONDS: "1" once the event is logged, "p:<ms>:<owner>" while pending."""
        return f"{self.prefix}e:{event_id}"

    @property
    def clock(self) -> str:
        """Sorted set with the one member CLOCK_MEMBER: the newest event second recorded ("now")."""
        return f"{self.prefix}clock"

    # -- trending -------------------------------------------------------------------------------------
    def trending_prefix(self, category: str | None) -> str:
        """Bucket keys are this prefix plus the hour: one sorted set item -> weighted events per hour."""
        if category is None:
            return f"{self.prefix}tg:"
        return f"{self.prefix}tc:{category}:"

    def trending_bucket(self, hour: int, category: str | None = None) -> str:
        return f"{self.trending_prefix(category)}{hour}"

    @property
    def trending_scratch(self) -> str:
        """Where a trending query merges its buckets; written and deleted inside one script."""
        return f"{self.prefix}tmp:trending"

    # -- catalog and merchandising overlays -----------------------------------------------------------
    def item(self, item_id: str) -> str:
        """Hash: field -> JSON value of the catalog overlay."""
        return f"{self.prefix}i:{item_id}"

    @property
    def item_prefix(self) -> str:
        return f"{self.prefix}i:"

    @property
    def catalog_version(self) -> str:
        return f"{self.prefix}catalog:version"

    @property
    def catalog_changes(self) -> str:
        """Sorted set: item id -> catalog version of its last change."""
        return f"{self.prefix}catalog:changes"

    @property
    def rules(self) -> str:
        """Hash: rule id -> JSON rule."""
        return f"{self.prefix}rules"

    @property
    def rules_version(self) -> str:
        return f"{self.prefix}rules:version"

    # -- operations -------------------------------------------------------------------------------------
    @property
    def bundle_pointer(self) -> str:
        return f"{self.prefix}bundle"

    @property
    def generation(self) -> str:
        """String: the token of the last complete build of this store from the event log. Its absence means
        the store lost its data (a Redis restarted without persistence) or was never built."""
        return f"{self.prefix}generation"

    def lock(self, name: str) -> str:
        """String with a time to live: who holds the named lock (e.g. the rebuild from the event log)."""
        return f"{self.prefix}lock:{name}"
