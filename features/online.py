"""The two online stores behind `features.store.OnlineStore`: Redis (shared by every worker) and in-process.

Both keep the same records (a user's recent events packed into a few bytes each, purchases, hourly trending
counters, consent, tombstones, catalog and rule overlays) and answer the same way, so the contract tests run
on both. On Redis each method is one round trip: a pipeline, or a script where a write depends on a read.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis

from features.keys import (
    CLAIM_TTL_SECONDS,
    CLOCK_MEMBER,
    TRENDING_TTL_SECONDS,
    USER_TTL_SECONDS,
    Keys,
    hour_of,
)
from features.schema import EventType
from features.store import (
    CLAIM_TAKEOVER_SECONDS,
    CONSENT_PURPOSES,
    INBOX_CAP,
    RECENT_CAP,
    REFERRERS_CAP,
    TRENDING_BUCKET_SECONDS,
    TRENDING_BUCKETS_KEPT,
    ClaimOutcome,
    OnlineEvent,
    OnlineStore,
    UserSnapshot,
)
from features.weights import DEFAULT_EVENT_WEIGHTS

TRENDING_HALF_LIFE_HOURS = 24.0  # an hour bucket counts half as much a day later

# -- packed recent-event records: ">IB" (second, type code) then the item id; code 0 spells the type out ----
_HEAD = struct.Struct(">IB")
_CODES: dict[str, int] = {kind.value: code for code, kind in enumerate(EventType, start=1)}
_TYPES: dict[int, str] = {code: kind for kind, code in _CODES.items()}


def pack_event(item_id: str, event_type: str, ts: float) -> bytes:
    """A recent-event record: 5 bytes plus the item id for the built-in event types."""
    code = _CODES.get(event_type, 0)
    head = _HEAD.pack(int(ts), code)
    if code:
        return head + item_id.encode()
    name = event_type.encode()
    if len(name) > 255:
        raise ValueError(f"event type longer than 255 bytes ({len(name)})")
    return head + bytes((len(name),)) + name + item_id.encode()


def unpack_event(user_id: str, record: bytes) -> OnlineEvent:
    second, code = _HEAD.unpack_from(record)
    rest = record[_HEAD.size :]
    if code:
        event_type = _TYPES[code]
    else:
        event_type, rest = rest[1 : 1 + rest[0]].decode(), rest[1 + rest[0] :]
    return OnlineEvent(user_id=user_id, item_id=rest.decode(), event_type=event_type, ts=float(second))


_SHARE_HEAD = struct.Struct(">IH")


def pack_share(sharer: str, item_id: str, ts: float) -> bytes:
    """An inbox record: second, the sharer id's length, the sharer id, the item id."""
    sharer_bytes = sharer.encode()
    return _SHARE_HEAD.pack(int(ts), len(sharer_bytes)) + sharer_bytes + item_id.encode()


def unpack_share(recipient: str, record: bytes) -> OnlineEvent:
    second, length = _SHARE_HEAD.unpack_from(record)
    rest = record[_SHARE_HEAD.size :]
    return OnlineEvent(user_id=rest[:length].decode(), item_id=rest[length:].decode(), event_type=EventType.SHARE,
                       ts=float(second), target_user_id=recipient)


def inbox_record(event: OnlineEvent) -> bytes | None:
    """The record a share puts in its recipient's inbox; None for other events and shares to nobody else."""
    target = event.target_user_id
    if event.event_type != EventType.SHARE or not target or target == event.user_id:
        return None
    return pack_share(event.user_id, event.item_id, event.ts)


def referred_through(event: OnlineEvent) -> str | None:
    """The referrer whose tie to the user an event shows (the user sees the referrer's activity from then
    on), None without one or when it names the user."""
    referrer = event.referrer_id
    return referrer if referrer and referrer != event.user_id else None


def _positive_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """Event types that make an item trend, with how much (refunds and impressions do not)."""
    chosen = DEFAULT_EVENT_WEIGHTS if weights is None else weights
    return {str(kind): float(w) for kind, w in chosen.items() if w > 0}


def _decay(age_hours: int, half_life_hours: float) -> float:
    return float(0.5 ** (age_hours / half_life_hours))


def _window(hours: int) -> int:
    return max(0, min(int(hours), TRENDING_BUCKETS_KEPT))


def _check_purposes(purposes: Mapping[str, bool]) -> None:
    unknown = sorted(set(purposes) - set(CONSENT_PURPOSES))
    if unknown:
        raise ValueError(f"{len(unknown)} unknown consent purpose(s); expected some of {list(CONSENT_PURPOSES)}")


def _insert_recent(recent: list[bytes], record: bytes, cap: int = RECENT_CAP) -> None:
    """Insert a packed record (it starts with its second) into a newest-first list, the way the Redis
    script does.

    It goes before the first record of the same second or older (so a later arrival of the same second comes
    first); a record already there is not added twice; the list keeps `cap` records.
    """
    second = _HEAD.unpack_from(record)[0]
    if not recent or _HEAD.unpack_from(recent[0])[0] < second:
        recent.insert(0, record)
    elif record not in recent:
        at = next((i for i, r in enumerate(recent) if _HEAD.unpack_from(r)[0] <= second), len(recent))
        recent.insert(at, record)
    del recent[cap:]


def _best_first(scores: Mapping[str, float], n: int) -> list[tuple[str, float]]:
    """Highest score first; ties by item id, highest first (the order of a Redis reverse range)."""
    return sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[: max(0, n)]


class MemoryStore:
    """In-process store: the embedded default for one worker and the fake for tests. Thread-safe."""

    def __init__(self, *, weights: Mapping[str, float] | None = None,
                 half_life_hours: float = TRENDING_HALF_LIFE_HOURS) -> None:
        self._weights = _positive_weights(weights)
        self._half_life = half_life_hours
        self._lock = threading.RLock()
        self._hits: dict[tuple[str, int], int] = {}
        self._claims: dict[str, _Held] = {}
        self._recent: dict[str, list[bytes]] = {}  # packed records, newest first
        self._inbox: dict[str, list[bytes]] = {}  # packed share records, newest first
        self._sent: dict[str, set[str]] = {}  # sharer or referrer -> whose inbox or referred_by holds them
        self._referred_by: dict[str, dict[str, int]] = {}  # user -> referrer -> second of the last such event
        self._came_from: dict[str, set[str]] = {}  # user -> whose sent sets note them (for their erasure)
        self._purchases: dict[str, dict[str, int]] = {}
        self._shared_items: dict[str, dict[str, int]] = {}  # user -> item -> second of their last share of it
        self._consent: dict[str, dict[str, bool]] = {}
        self._erased: set[str] = set()
        self._buckets: dict[tuple[str | None, int], dict[str, float]] = {}
        self._clock: int | None = None
        self._items: dict[str, dict[str, object]] = {}
        self._item_versions: dict[str, int] = {}
        self._catalog_version = 0
        self._rules: dict[str, dict[str, object]] = {}
        self._rules_version = 0
        self._pointer: str | None = None
        self._generation: str | None = None
        self._locks: dict[str, tuple[str, float]] = {}  # name -> (owner, monotonic expiry)

    def claim_pending(self, event_ids: Sequence[str], owner: str,
                      takeover_seconds: float = CLAIM_TAKEOVER_SECONDS) -> list[ClaimOutcome]:
        now = time.monotonic()
        out: list[ClaimOutcome] = []
        with self._lock:
            mine: set[str] = set()
            for event_id in event_ids:
                held = self._claims.get(event_id)
                if held is None or held.expires <= now:
                    outcome = ClaimOutcome.NEW
                elif held.owner is None or event_id in mine:
                    outcome = ClaimOutcome.DONE
                elif now - held.since >= takeover_seconds:
                    outcome = ClaimOutcome.TAKEN_OVER
                else:
                    outcome = ClaimOutcome.BUSY
                if outcome in (ClaimOutcome.NEW, ClaimOutcome.TAKEN_OVER):
                    self._claims[event_id] = _Held(now + CLAIM_TTL_SECONDS, owner, now)
                    mine.add(event_id)
                out.append(outcome)
            self._forget_expired(now)
        return out

    def finish_claims(self, event_ids: Sequence[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for event_id in event_ids:
                self._claims[event_id] = _Held(now + CLAIM_TTL_SECONDS, None, now)
            self._forget_expired(now)

    def claim_event_ids(self, event_ids: Sequence[str]) -> list[bool]:
        now = time.monotonic()
        out = []
        with self._lock:
            for event_id in event_ids:
                held = self._claims.get(event_id)
                out.append(held is None or held.expires <= now)
                self._claims[event_id] = _Held(now + CLAIM_TTL_SECONDS, None, now)
            self._forget_expired(now)
        return out

    def release_event_ids(self, event_ids: Sequence[str], owner: str) -> None:
        with self._lock:
            for event_id in event_ids:
                held = self._claims.get(event_id)
                if held is not None and held.owner == owner:
                    del self._claims[event_id]

    def _forget_expired(self, now: float) -> None:
        # Called with self._lock held.
        if len(self._claims) > 100_000:
            self._claims = {k: v for k, v in self._claims.items() if v.expires > now}

    def record(self, events: Sequence[OnlineEvent]) -> None:
        with self._lock:
            for event in events:
                if event.user_id in self._erased:
                    continue
                second = int(event.ts)
                recent = self._recent.setdefault(event.user_id, [])
                _insert_recent(recent, pack_event(event.item_id, event.event_type, second))
                shared = inbox_record(event)
                if shared is not None and event.target_user_id not in self._erased:
                    _insert_recent(self._inbox.setdefault(str(event.target_user_id), []), shared, INBOX_CAP)
                    self._note_tie(event.user_id, str(event.target_user_id))
                referrer = referred_through(event)
                if referrer is not None and referrer not in self._erased:
                    through = self._referred_by.setdefault(event.user_id, {})
                    through[referrer] = max(second, through.get(referrer, second))
                    if len(through) > REFERRERS_CAP:  # the oldest goes (the lowest id among the oldest)
                        del through[min(through, key=lambda r: (through[r], r))]
                    self._note_tie(referrer, event.user_id)
                if event.event_type in (EventType.PURCHASE, EventType.SHARE):
                    table = self._purchases if event.event_type == EventType.PURCHASE else self._shared_items
                    last = table.setdefault(event.user_id, {})
                    last[event.item_id] = max(second, last.get(event.item_id, second))
                elif event.event_type == EventType.REFUND:
                    self._purchases.get(event.user_id, {}).pop(event.item_id, None)
                weight = self._weights.get(event.event_type, 0.0)
                if weight:
                    hour = hour_of(second)
                    for category in {None, event.category}:
                        bucket = self._buckets.setdefault((category, hour), {})
                        bucket[event.item_id] = bucket.get(event.item_id, 0.0) + weight
                self._clock = second if self._clock is None else max(self._clock, second)
            if self._clock is not None:
                oldest = hour_of(self._clock) - TRENDING_BUCKETS_KEPT
                for key in [k for k in self._buckets if k[1] <= oldest]:
                    del self._buckets[key]

    def _note_tie(self, source: str, user: str) -> None:
        # Called with self._lock held: `user` holds a record of `source`'s (a share, a referral).
        self._sent.setdefault(source, set()).add(user)
        self._came_from.setdefault(user, set()).add(source)

    def recent(self, user_id: str, limit: int = RECENT_CAP) -> list[OnlineEvent]:
        with self._lock:
            records = self._recent.get(user_id, [])[: max(0, limit)]
        return [unpack_event(user_id, record) for record in records]

    def purchased(self, user_id: str) -> dict[str, float]:
        with self._lock:
            return {item: float(ts) for item, ts in self._purchases.get(user_id, {}).items()}

    def activity_of(self, user_ids: Sequence[str]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        with self._lock:
            return tuple(  # type: ignore[return-value]
                {user: {item: float(ts) for item, ts in table[user].items()} for user in user_ids if table.get(user)}
                for table in (self._purchases, self._shared_items))

    def snapshot(self, user_id: str, friends: Sequence[str] = ()) -> UserSnapshot:
        with self._lock:
            shared = [unpack_share(user_id, record) for record in self._inbox.get(user_id, [])]
            bought, their_shares = self.activity_of(friends)
            referred = {referrer: float(ts) for referrer, ts in self._referred_by.get(user_id, {}).items()}
            return UserSnapshot(self.recent(user_id), self.purchased(user_id), self.consent(user_id),
                                user_id in self._erased, shared, bought, referred, their_shares)

    def trending(self, hours: int, n: int, category: str | None = None) -> list[tuple[str, float]]:
        with self._lock:
            if self._clock is None:
                return []
            now = hour_of(self._clock)
            scores: dict[str, float] = {}
            for age in range(_window(hours)):
                weight = _decay(age, self._half_life)
                for item, count in self._buckets.get((category, now - age), {}).items():
                    scores[item] = scores.get(item, 0.0) + count * weight
        return _best_first(scores, n)

    def set_consent(self, user_id: str, purposes: Mapping[str, bool]) -> None:
        _check_purposes(purposes)
        with self._lock:
            if user_id not in self._erased:
                self._consent.setdefault(user_id, {}).update({p: bool(v) for p, v in purposes.items()})

    def consent(self, user_id: str) -> dict[str, bool]:
        with self._lock:
            given = self._consent.get(user_id, {})
            return {purpose: given.get(purpose, True) for purpose in CONSENT_PURPOSES}

    def consents(self, user_ids: Sequence[str]) -> list[dict[str, bool]]:
        everything = dict.fromkeys(CONSENT_PURPOSES, True)
        with self._lock:  # once for the batch: segments ask this of many thousands of users
            stated = [self._consent.get(user_id) for user_id in user_ids]
        return [dict(everything) if given is None else {p: given.get(p, True) for p in CONSENT_PURPOSES}
                for given in stated]

    def erase_user(self, user_id: str) -> None:
        with self._lock:
            sources = self._came_from.pop(user_id, set()) | set(self._referred_by.get(user_id, {}))
            sources |= {unpack_share(user_id, record).user_id for record in self._inbox.get(user_id, [])}
            for source in sources:
                self._sent.get(source, set()).discard(user_id)
            for recipient in self._sent.pop(user_id, set()):
                inbox = self._inbox.get(recipient, [])
                inbox[:] = [record for record in inbox if unpack_share(recipient, record).user_id != user_id]
                self._referred_by.get(recipient, {}).pop(user_id, None)
                self._came_from.get(recipient, set()).discard(user_id)
            for table in (self._recent, self._purchases, self._shared_items, self._inbox, self._referred_by,
                          self._consent):
                table.pop(user_id, None)
            self._erased.add(user_id)

    def erased(self, user_ids: Sequence[str]) -> list[bool]:
        with self._lock:
            return [user_id in self._erased for user_id in user_ids]

    def standings(self, user_ids: Sequence[str]) -> tuple[list[bool], list[dict[str, bool]]]:
        return self.erased(user_ids), self.consents(user_ids)

    def put_items(self, items: Sequence[Mapping[str, object]]) -> int:
        rows = [_catalog_row(item) for item in items]
        with self._lock:
            if not rows:
                return self._catalog_version
            self._catalog_version += 1
            for item_id, fields in rows:
                self._items.setdefault(item_id, {}).update(orjson.loads(orjson.dumps(fields)))
                self._item_versions[item_id] = self._catalog_version
            return self._catalog_version

    def items_since(self, version: int) -> tuple[int, list[dict[str, object]]]:
        with self._lock:
            changed = sorted((v, item) for item, v in self._item_versions.items() if v > version)
            return self._catalog_version, [{"item_id": item, **self._items.get(item, {})} for _, item in changed]

    def put_rule(self, rule_id: str, rule: Mapping[str, object]) -> int:
        copy: dict[str, object] = orjson.loads(orjson.dumps(dict(rule)))
        with self._lock:
            self._rules[rule_id] = copy
            self._rules_version += 1
            return self._rules_version

    def delete_rule(self, rule_id: str) -> bool:
        with self._lock:
            if self._rules.pop(rule_id, None) is None:
                return False
            self._rules_version += 1
            return True

    def rules(self) -> tuple[int, dict[str, dict[str, object]]]:
        with self._lock:
            return self._rules_version, {k: orjson.loads(orjson.dumps(v)) for k, v in self._rules.items()}

    def set_bundle_pointer(self, reference: str) -> None:
        with self._lock:
            self._pointer = reference

    def bundle_pointer(self) -> str | None:
        with self._lock:
            return self._pointer

    def user_bytes(self, user_id: str) -> int:
        """Payload bytes only (records, item ids, purposes): a lower bound of what Redis would spend."""
        with self._lock:
            recent = sum(len(record) for record in (*self._recent.get(user_id, []), *self._inbox.get(user_id, [])))
            bought = sum(len(item.encode()) + 4 for item in self._purchases.get(user_id, {}))
            bought += sum(len(item.encode()) + 4 for item in self._shared_items.get(user_id, {}))
            bought += sum(len(referrer.encode()) + 4 for referrer in self._referred_by.get(user_id, {}))
            given = sum(len(purpose) + 1 for purpose in self._consent.get(user_id, {}))
        return recent + bought + given

    def hit(self, bucket: str, window_seconds: int) -> int:
        window = int(time.time()) // window_seconds
        with self._lock:
            key = (bucket, window)
            if key not in self._hits:
                self._hits = {k: v for k, v in self._hits.items() if k[1] >= window}  # older windows go
            self._hits[key] = self._hits.get(key, 0) + 1
            return self._hits[key]

    def ping(self) -> bool:
        return True

    def generation(self) -> str | None:
        with self._lock:
            return self._generation

    def set_generation(self, value: str) -> None:
        with self._lock:
            self._generation = value

    def acquire_lock(self, name: str, owner: str, ttl_seconds: float) -> bool:
        now = time.monotonic()
        with self._lock:
            held = self._locks.get(name)
            if held is not None and held[1] > now and held[0] != owner:
                return False
            self._locks[name] = (owner, now + ttl_seconds)
            return True

    def release_lock(self, name: str, owner: str) -> None:
        with self._lock:
            held = self._locks.get(name)
            if held is not None and held[0] == owner:
                del self._locks[name]


@dataclass(frozen=True, slots=True)
class _Held:
    """An event id claim of the in-process store (monotonic times)."""

    expires: float
    owner: str | None  # the request logging it while pending; None once done (in the log)
    since: float  # when it was claimed pending


def _catalog_row(item: Mapping[str, object]) -> tuple[str, dict[str, object]]:
    item_id = item.get("item_id")
    if not isinstance(item_id, str) or not item_id:
        raise ValueError("catalog row without a string item_id")  # not the row: messages end up in logs
    return item_id, {str(k): v for k, v in item.items() if k != "item_id"}


# -- Redis ---------------------------------------------------------------------------------------------------
# KEYS: tombstones, clock, then per event: recent, the hash the action writes (purchases; shared items for a
# share), global bucket, category bucket (the global one again when the event has no category), the
# recipient's inbox (any key for an event without one), the sender's sent set, the user's referred_by hash,
# the referrer's sent set (any key without a referrer), the recipient's came_from set (any key without one),
# the user's came_from set. ARGV: cap, user ttl, bucket ttl, clock member, inbox cap, referrers cap, then per
# event: user, record, second, item, action ("p" purchase and "s" share: the last second per item; "r" refund:
# the purchase goes; "-"), trending weight ("0" for none), the recipient ("" for none), the inbox record, the
# referrer ("" for none).
_RECORD = """
local cap, user_ttl, bucket_ttl, inbox_cap = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[5])
local referrers_cap = tonumber(ARGV[6])
-- byte order, as Python orders the ids (Lua's < follows the server's locale)
local function bytewise_before(x, y)
  for j = 1, math.min(#x, #y) do
    local a, b = string.byte(x, j), string.byte(y, j)
    if a ~= b then return a < b end
  end
  return #x < #y
end
local erased = {}
local function is_erased(user)
  if erased[user] == nil then erased[user] = redis.call('SISMEMBER', KEYS[1], user) == 1 end
  return erased[user]
end
-- newest first by second; before the first record of the same second or older; never twice
local function insert(key, record, limit)
  local at = struct.unpack('>I4', record)
  local head = redis.call('LINDEX', key, 0)
  if not head or struct.unpack('>I4', head) < at then
    redis.call('LPUSH', key, record)
  else
    local pivot, seen = nil, false
    for _, kept in ipairs(redis.call('LRANGE', key, 0, -1)) do
      if kept == record then seen = true break end
      if pivot == nil and struct.unpack('>I4', kept) <= at then pivot = kept end
    end
    if not seen then
      if pivot then redis.call('LINSERT', key, 'BEFORE', pivot, record)
      else redis.call('RPUSH', key, record) end
    end
  end
  redis.call('LTRIM', key, 0, limit - 1)
  redis.call('EXPIRE', key, user_ttl)
end
for i = 0, (#KEYS - 2) / 10 - 1 do
  local k, a = 3 + 10 * i, 7 + 9 * i
  local user, second, item = ARGV[a], ARGV[a + 2], ARGV[a + 3]
  if not is_erased(user) then
    insert(KEYS[k], ARGV[a + 1], cap)
    local action = ARGV[a + 4]
    if action == 'p' or action == 's' then
      local last = redis.call('HGET', KEYS[k + 1], item)
      if not last or tonumber(last) < tonumber(second) then redis.call('HSET', KEYS[k + 1], item, second) end
      redis.call('EXPIRE', KEYS[k + 1], user_ttl)
    elseif action == 'r' then
      redis.call('HDEL', KEYS[k + 1], item)
    end
    local weight = ARGV[a + 5]
    if weight ~= '0' then
      redis.call('ZINCRBY', KEYS[k + 2], weight, item)
      redis.call('EXPIRE', KEYS[k + 2], bucket_ttl)
      if KEYS[k + 3] ~= KEYS[k + 2] then
        redis.call('ZINCRBY', KEYS[k + 3], weight, item)
        redis.call('EXPIRE', KEYS[k + 3], bucket_ttl)
      end
    end
    local target = ARGV[a + 6]
    if target ~= '' and not is_erased(target) then
      insert(KEYS[k + 4], ARGV[a + 7], inbox_cap)
      -- no expiry on either: they must outlive every record they point at
      redis.call('SADD', KEYS[k + 5], target)
      redis.call('SADD', KEYS[k + 8], user)
    end
    local referrer = ARGV[a + 8]
    if referrer ~= '' and not is_erased(referrer) then
      local last = redis.call('HGET', KEYS[k + 6], referrer)
      if not last or tonumber(last) < tonumber(second) then redis.call('HSET', KEYS[k + 6], referrer, second) end
      if redis.call('HLEN', KEYS[k + 6]) > referrers_cap then  -- the oldest goes (the lowest id among the oldest)
        local fields, oldest, oldest_at = redis.call('HGETALL', KEYS[k + 6]), nil, nil
        for j = 1, #fields, 2 do
          local at = tonumber(fields[j + 1])
          if oldest == nil or at < oldest_at or (at == oldest_at and bytewise_before(fields[j], oldest)) then
            oldest, oldest_at = fields[j], at
          end
        end
        redis.call('HDEL', KEYS[k + 6], oldest)
      end
      redis.call('EXPIRE', KEYS[k + 6], user_ttl)
      redis.call('SADD', KEYS[k + 7], user)
      redis.call('SADD', KEYS[k + 9], referrer)
    end
    redis.call('ZADD', KEYS[2], 'GT', second, ARGV[4])
  end
end
return 0
"""

_ACTIONS = {EventType.PURCHASE.value: "p", EventType.REFUND.value: "r", EventType.SHARE.value: "s"}

# KEYS: tombstones, the user's sent set, the user's came_from set, then every key of the user. ARGV: user id,
# inbox, sent set, referred_by and came_from key prefixes. The user leaves the sent sets of those whose shares
# or referrals reached them (the came_from set names them, and so do the user's inbox and referred_by, which
# records written before the came_from sets need); their shares leave the inboxes of everyone they reached,
# and they leave the referred_by and came_from of everyone who came through them; then their keys go and the
# tombstone stays.
_ERASE = """
local user = ARGV[1]
for _, source in ipairs(redis.call('SMEMBERS', KEYS[3])) do redis.call('SREM', ARGV[3] .. source, user) end
-- and those the user's own records name (records older than the came_from sets have no entry there)
for _, record in ipairs(redis.call('LRANGE', ARGV[2] .. user, 0, -1)) do
  local _, length = struct.unpack('>I4I2', record)
  redis.call('SREM', ARGV[3] .. string.sub(record, 7, 6 + length), user)
end
for _, referrer in ipairs(redis.call('HKEYS', ARGV[4] .. user)) do redis.call('SREM', ARGV[3] .. referrer, user) end
for _, recipient in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local inbox = ARGV[2] .. recipient
  for _, record in ipairs(redis.call('LRANGE', inbox, 0, -1)) do
    local _, length = struct.unpack('>I4I2', record)
    if string.sub(record, 7, 6 + length) == user then redis.call('LREM', inbox, 0, record) end
  end
  redis.call('HDEL', ARGV[4] .. recipient, user)
  redis.call('SREM', ARGV[5] .. recipient, user)
end
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('SADD', KEYS[1], user)
return 0
"""

# KEYS: clock, scratch. ARGV: bucket key prefix, hours, n, half-life hours, bucket seconds, clock member.
# The bucket keys depend on the clock, so they are built here (a single-node Redis allows it).
_TRENDING = """
local now = redis.call('ZSCORE', KEYS[1], ARGV[6])
if not now then return {} end
local hour = math.floor(tonumber(now) / tonumber(ARGV[5]))
local hours, half_life = tonumber(ARGV[2]), tonumber(ARGV[4])
local args = {KEYS[2], hours}
for age = 0, hours - 1 do table.insert(args, ARGV[1] .. string.format('%d', hour - age)) end
table.insert(args, 'WEIGHTS')
for age = 0, hours - 1 do table.insert(args, string.format('%.17g', 0.5 ^ (age / half_life))) end
redis.call('ZUNIONSTORE', unpack(args))
local out = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[3]) - 1, 'REV', 'WITHSCORES')
redis.call('DEL', KEYS[2])
return out
"""

# KEYS: tombstones, consent hash. ARGV: user, then purpose, value pairs.
_SET_CONSENT = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 1
"""

# KEYS: version, changes, then one hash per item. ARGV: per item: item id, field count, field, value, ...
_PUT_ITEMS = """
local version = redis.call('INCR', KEYS[1])
local a = 1
for i = 3, #KEYS do
  local item, count = ARGV[a], tonumber(ARGV[a + 1])
  if count > 0 then redis.call('HSET', KEYS[i], unpack(ARGV, a + 2, a + 1 + 2 * count)) end
  redis.call('ZADD', KEYS[2], version, item)
  a = a + 2 + 2 * count
end
return version
"""

# KEYS: version, changes. ARGV: since, item key prefix.
_ITEMS_SINCE = """
local out = {tonumber(redis.call('GET', KEYS[1]) or '0')}
for _, item in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')) do
  table.insert(out, item)
  table.insert(out, redis.call('HGETALL', ARGV[2] .. item))
end
return out
"""

# KEYS: rules, version. ARGV: rule id.
_DELETE_RULE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('INCR', KEYS[2])
return 1
"""

# Event id claims: "1" once done (the log holds the event), "p:<ms>:<owner>" while pending (claimed before the
# log append by `owner`, at <ms> on the server's clock, which every worker shares).
_DONE = b"1"
_OUTCOMES = (ClaimOutcome.NEW, ClaimOutcome.TAKEN_OVER, ClaimOutcome.DONE, ClaimOutcome.BUSY)

# KEYS: claims. ARGV: owner, takeover ms, ttl s. Returns an index into _OUTCOMES per key.
_CLAIM_PENDING = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine, takeover, ttl = 'p:' .. now .. ':' .. ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out, claimed = {}, {}
for i, key in ipairs(KEYS) do
  local held = redis.call('GET', key)
  local outcome
  if not held then outcome = 0
  elseif claimed[key] or string.sub(held, 1, 2) ~= 'p:' then outcome = 2
  else
    local since = tonumber(string.match(held, '^p:(%d+):'))
    if since == nil or now - since >= takeover then outcome = 1 else outcome = 3 end
  end
  if outcome < 2 then
    redis.call('SET', key, mine, 'EX', ttl)
    claimed[key] = true
  end
  out[i] = outcome
end
return out
"""

# KEYS: claims. ARGV: owner. Only the owner's pending claims go (one taken over or done since stays).
_RELEASE_CLAIMS = """
for _, key in ipairs(KEYS) do
  local held = redis.call('GET', key)
  if held and string.match(held, '^p:%d+:(.*)$') == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""

# KEYS: lock. ARGV: owner, ttl in ms. The holder taking its own lock again extends it.
_EXTEND_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lock. ARGV: owner. Only the holder releases it (a lapsed lock may have a new holder).
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """The online store on a Redis server (>= 6.2), shared by every worker process.

    Redis errors propagate as `redis.RedisError`: deciding what to serve without the store is the caller's.
    """

    def __init__(self, url: str, prefix: str = "sf:", *, weights: Mapping[str, float] | None = None,
                 half_life_hours: float = TRENDING_HALF_LIFE_HOURS) -> None:
        self.keys = Keys(prefix)
        self._redis: redis.Redis = redis.Redis.from_url(url, decode_responses=False)
        self._weights = _positive_weights(weights)
        self._half_life = half_life_hours
        self._record = self._redis.register_script(_RECORD)
        self._trending = self._redis.register_script(_TRENDING)
        self._set_consent = self._redis.register_script(_SET_CONSENT)
        self._put_items = self._redis.register_script(_PUT_ITEMS)
        self._items_since = self._redis.register_script(_ITEMS_SINCE)
        self._delete_rule = self._redis.register_script(_DELETE_RULE)
        self._extend_lock = self._redis.register_script(_EXTEND_LOCK)
        self._release_lock = self._redis.register_script(_RELEASE_LOCK)
        self._claim_pending = self._redis.register_script(_CLAIM_PENDING)
        self._erase = self._redis.register_script(_ERASE)
        self._release_claims = self._redis.register_script(_RELEASE_CLAIMS)

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def close(self) -> None:
        self._redis.close()

    def claim_pending(self, event_ids: Sequence[str], owner: str,
                      takeover_seconds: float = CLAIM_TAKEOVER_SECONDS) -> list[ClaimOutcome]:
        if not event_ids:
            return []
        codes = self._claim_pending(keys=[self.keys.event_id(event_id) for event_id in event_ids],
                                    args=[owner, max(0, int(takeover_seconds * 1000)), CLAIM_TTL_SECONDS])
        return [_OUTCOMES[int(code)] for code in codes]

    def finish_claims(self, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        pipe = self._redis.pipeline(transaction=False)
        for event_id in event_ids:
            pipe.set(self.keys.event_id(event_id), _DONE, ex=CLAIM_TTL_SECONDS)
        pipe.execute()

    def claim_event_ids(self, event_ids: Sequence[str]) -> list[bool]:
        if not event_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for event_id in event_ids:
            pipe.set(self.keys.event_id(event_id), _DONE, ex=CLAIM_TTL_SECONDS, get=True)
        return [held is None for held in pipe.execute()]

    def release_event_ids(self, event_ids: Sequence[str], owner: str) -> None:
        if event_ids:
            self._release_claims(keys=[self.keys.event_id(event_id) for event_id in event_ids], args=[owner])

    def record(self, events: Sequence[OnlineEvent]) -> None:
        if not events:
            return
        keys: list[str] = [self.keys.tombstones, self.keys.clock]
        args: list[Any] = [RECENT_CAP, USER_TTL_SECONDS, TRENDING_TTL_SECONDS, CLOCK_MEMBER, INBOX_CAP,
                           REFERRERS_CAP]
        for event in events:
            second = int(event.ts)
            hour = hour_of(second)
            everywhere = self.keys.trending_bucket(hour)
            shared = inbox_record(event)
            target = str(event.target_user_id) if shared is not None else ""
            referrer = referred_through(event)
            keys += [
                self.keys.recent(event.user_id),
                self.keys.shared_items(event.user_id) if event.event_type == EventType.SHARE
                else self.keys.purchases(event.user_id),
                everywhere,
                everywhere if event.category is None else self.keys.trending_bucket(hour, event.category),
                self.keys.inbox(target) if target else self.keys.recent(event.user_id),  # unused without a target
                self.keys.sent(event.user_id),
                self.keys.referred_by(event.user_id),
                self.keys.sent(referrer) if referrer else self.keys.sent(event.user_id),  # unused without one
                self.keys.came_from(target) if target else self.keys.came_from(event.user_id),  # the same
                self.keys.came_from(event.user_id),
            ]
            action = _ACTIONS.get(event.event_type, "-")
            weight = self._weights.get(event.event_type, 0.0)
            args += [event.user_id, pack_event(event.item_id, event.event_type, second), second, event.item_id,
                     action, repr(weight) if weight else "0", target, shared or b"", referrer or ""]
        self._record(keys=keys, args=args)

    def recent(self, user_id: str, limit: int = RECENT_CAP) -> list[OnlineEvent]:
        if limit <= 0:
            return []
        records = cast(list[bytes], self._redis.lrange(self.keys.recent(user_id), 0, limit - 1))
        return [unpack_event(user_id, record) for record in records]

    def purchased(self, user_id: str) -> dict[str, float]:
        stored = cast(dict[bytes, bytes], self._redis.hgetall(self.keys.purchases(user_id)))
        return {item.decode(): float(ts) for item, ts in stored.items()}

    def activity_of(self, user_ids: Sequence[str]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        pipe = self._redis.pipeline(transaction=False)
        self._read_activity(pipe, user_ids)
        return _activity(user_ids, cast(list[dict[bytes, bytes]], pipe.execute()))

    def _read_activity(self, pipe: Any, user_ids: Sequence[str]) -> None:
        for user in user_ids:
            pipe.hgetall(self.keys.purchases(user))
        for user in user_ids:
            pipe.hgetall(self.keys.shared_items(user))

    def snapshot(self, user_id: str, friends: Sequence[str] = ()) -> UserSnapshot:
        pipe = self._redis.pipeline(transaction=False)
        pipe.lrange(self.keys.recent(user_id), 0, RECENT_CAP - 1)
        pipe.hgetall(self.keys.purchases(user_id))
        pipe.hgetall(self.keys.consent(user_id))
        pipe.sismember(self.keys.tombstones, user_id)
        pipe.lrange(self.keys.inbox(user_id), 0, INBOX_CAP - 1)
        pipe.hgetall(self.keys.referred_by(user_id))
        self._read_activity(pipe, friends)
        Stored = dict[bytes, bytes]
        records, bought, given, erased, inbox, referred, *theirs = cast(
            tuple[list[bytes], Stored, Stored, int, list[bytes], Stored, *tuple[Stored, ...]], pipe.execute())
        stated = {purpose.decode(): value == b"1" for purpose, value in given.items()}
        friends_bought, friends_shared = _activity(friends, theirs)
        return UserSnapshot([unpack_event(user_id, record) for record in records],
                            {item.decode(): float(ts) for item, ts in bought.items()},
                            {purpose: stated.get(purpose, True) for purpose in CONSENT_PURPOSES}, bool(erased),
                            [unpack_share(user_id, record) for record in inbox], friends_bought,
                            {referrer.decode(): float(ts) for referrer, ts in referred.items()}, friends_shared)

    def trending(self, hours: int, n: int, category: str | None = None) -> list[tuple[str, float]]:
        window = _window(hours)
        if window == 0 or n <= 0:
            return []
        flat = self._trending(
            keys=[self.keys.clock, self.keys.trending_scratch],
            args=[self.keys.trending_prefix(category), window, n, repr(self._half_life),
                  TRENDING_BUCKET_SECONDS, CLOCK_MEMBER],
        )
        return [(flat[i].decode(), float(flat[i + 1])) for i in range(0, len(flat), 2)]

    def set_consent(self, user_id: str, purposes: Mapping[str, bool]) -> None:
        _check_purposes(purposes)
        if not purposes:
            return
        pairs: list[str] = []
        for purpose, given in purposes.items():
            pairs += [purpose, "1" if given else "0"]
        self._set_consent(keys=[self.keys.tombstones, self.keys.consent(user_id)], args=[user_id, *pairs])

    def consent(self, user_id: str) -> dict[str, bool]:
        stored = cast(dict[bytes, bytes], self._redis.hgetall(self.keys.consent(user_id)))
        given = {purpose.decode(): value == b"1" for purpose, value in stored.items()}
        return {purpose: given.get(purpose, True) for purpose in CONSENT_PURPOSES}

    def consents(self, user_ids: Sequence[str]) -> list[dict[str, bool]]:
        return self.standings(user_ids)[1]

    def standings(self, user_ids: Sequence[str]) -> tuple[list[bool], list[dict[str, bool]]]:
        if not user_ids:
            return [], []
        pipe = self._redis.pipeline(transaction=False)
        pipe.smismember(self.keys.tombstones, list(user_ids))
        for user_id in user_ids:
            pipe.hgetall(self.keys.consent(user_id))
        flags, *stored_rows = pipe.execute()
        consents = []
        for stored in cast(list[dict[bytes, bytes]], stored_rows):
            given = {purpose.decode(): value == b"1" for purpose, value in stored.items()}
            consents.append({purpose: given.get(purpose, True) for purpose in CONSENT_PURPOSES})
        return [bool(flag) for flag in flags], consents

    def erase_user(self, user_id: str) -> None:
        keys = self.keys
        self._erase(keys=[keys.tombstones, keys.sent(user_id), keys.came_from(user_id), *keys.user_keys(user_id)],
                    args=[user_id, keys.inbox_prefix, keys.sent_prefix, keys.referred_by_prefix,
                          keys.came_from_prefix])

    def erased(self, user_ids: Sequence[str]) -> list[bool]:
        if not user_ids:
            return []
        return [bool(flag) for flag in self._redis.smismember(self.keys.tombstones, list(user_ids))]

    def put_items(self, items: Sequence[Mapping[str, object]]) -> int:
        rows = [_catalog_row(item) for item in items]
        if not rows:
            return int(self._redis.get(self.keys.catalog_version) or 0)
        keys = [self.keys.catalog_version, self.keys.catalog_changes]
        args: list[Any] = []
        for item_id, fields in rows:
            keys.append(self.keys.item(item_id))
            args += [item_id, len(fields)]
            for field, value in fields.items():
                args += [field, orjson.dumps(value)]
        return int(self._put_items(keys=keys, args=args))

    def items_since(self, version: int) -> tuple[int, list[dict[str, object]]]:
        flat = self._items_since(keys=[self.keys.catalog_version, self.keys.catalog_changes],
                                 args=[int(version), self.keys.item_prefix])
        rows: list[dict[str, object]] = []
        for i in range(1, len(flat), 2):
            fields = flat[i + 1]
            row: dict[str, object] = {"item_id": flat[i].decode()}
            row.update({fields[j].decode(): orjson.loads(fields[j + 1]) for j in range(0, len(fields), 2)})
            rows.append(row)
        return int(flat[0]), rows

    def put_rule(self, rule_id: str, rule: Mapping[str, object]) -> int:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self.keys.rules, rule_id, orjson.dumps(dict(rule)))
        pipe.incr(self.keys.rules_version)
        return int(pipe.execute()[1])

    def delete_rule(self, rule_id: str) -> bool:
        return bool(self._delete_rule(keys=[self.keys.rules, self.keys.rules_version], args=[rule_id]))

    def rules(self) -> tuple[int, dict[str, dict[str, object]]]:
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self.keys.rules_version)
        pipe.hgetall(self.keys.rules)
        version, stored = pipe.execute()
        return int(version or 0), {rule_id.decode(): orjson.loads(rule) for rule_id, rule in stored.items()}

    def set_bundle_pointer(self, reference: str) -> None:
        self._redis.set(self.keys.bundle_pointer, reference.encode())

    def bundle_pointer(self) -> str | None:
        value = cast(bytes | None, self._redis.get(self.keys.bundle_pointer))
        return None if value is None else value.decode()

    def user_bytes(self, user_id: str) -> int:
        pipe = self._redis.pipeline(transaction=False)
        for key in self.keys.user_keys(user_id):
            pipe.memory_usage(key, samples=0)
        return sum(int(used or 0) for used in pipe.execute())

    def hit(self, bucket: str, window_seconds: int) -> int:
        window = int(time.time()) // window_seconds
        key = self.keys.rate(bucket, window)
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, window_seconds * 2)
        count, _ = pipe.execute()
        return int(count)

    def ping(self) -> bool:
        return bool(self._redis.ping())

    def generation(self) -> str | None:
        value = cast(bytes | None, self._redis.get(self.keys.generation))
        return None if value is None else value.decode()

    def set_generation(self, value: str) -> None:
        self._redis.set(self.keys.generation, value.encode())

    def acquire_lock(self, name: str, owner: str, ttl_seconds: float) -> bool:
        key = self.keys.lock(name)
        if self._redis.set(key, owner.encode(), nx=True, px=max(1, int(ttl_seconds * 1000))):
            return True
        return bool(self._extend_lock(keys=[key], args=[owner, max(1, int(ttl_seconds * 1000))]))

    def release_lock(self, name: str, owner: str) -> None:
        self._release_lock(keys=[self.keys.lock(name)], args=[owner])


# What an unavailable online store raises (a Redis server down, restarting or unreachable). Callers that can
# answer without the store catch these, log them and mark the answer degraded; anything else is a bug.
STORE_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, OSError)
# The errors of a Redis server that did not answer (down, restarting, unreachable, too slow): an endpoint that
# cannot do without the store lets them through, and the service answers 503 for them.
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)


def open_store(url: str | None, prefix: str = "sf:") -> OnlineStore:
    """A Redis store for a URL, the in-process store for None (the embedded default)."""
    if url is None:
        return MemoryStore()
    return RedisStore(url, prefix)


def _activity(user_ids: Sequence[str], stored: Sequence[dict[bytes, bytes]]
              ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """The purchase hashes then the shared-item hashes read for `user_ids` (in order each), as item id -> time;
    users without any are left out."""
    def by_user(hashes: Sequence[dict[bytes, bytes]]) -> dict[str, dict[str, float]]:
        return {user: {item.decode(): float(ts) for item, ts in hashed.items()}
                for user, hashed in zip(user_ids, hashes, strict=True) if hashed}

    return by_user(stored[: len(user_ids)]), by_user(stored[len(user_ids) :])
