"""The online store through outages: events keep being acknowledged while Redis is away, and the store is
brought back in line with the durable event log when it returns.

Event ids are claimed pending (by one request) before their batch is logged and done after, in the store and,
as a fallback, in this process's memory; an id pending elsewhere for less than `takeover_seconds` makes the
batch wait (`Claim.busy`), an older one is taken over (its claimer died before logging it). While the store
does not answer, an event batch is still deduplicated (against the ids this process saw lately), logged and
acknowledged; what could not be recorded waits in a bounded backlog. A background check
(`run`) reads the store's generation key: when it is still there, the store only was unreachable and the
backlog is recorded; when it is gone, the store lost its data (a restart without persistence) and one worker,
holding a lock, replays the log of the online window (control rows included) and writes a new generation.
Until then the store is "not ready": feeds answer from the bundle, with consent and erasures from the event
log's ledger (`serving.privacy`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from features.eventlog import ReplayStats, apply_control, read_control, read_events, replay
from features.online import STORE_ERRORS
from features.store import CLAIM_TAKEOVER_SECONDS, ClaimOutcome, OnlineEvent, OnlineStore
from serving import metrics

log = logging.getLogger(__name__)

REBUILD_LOCK = "rebuild"
SEEN_IDS_KEPT = 100_000  # event ids this process remembers as a fallback dedupe while the store is away
LOCK_TTL_SECONDS = 60.0  # the rebuild lock lapses this long after its holder stopped extending it
OVERFLOW_SLACK_SECONDS = 60.0  # an overflowed backlog is replayed from this long before the outage began


@dataclass(frozen=True, slots=True)
class Claim:
    fresh: list[bool]  # per id: claimed pending for this request (new, or taken over), so to be logged
    in_store: bool  # the store took the claims (False: only this process's memory did)
    owner: str = ""  # the claims are pending under this owner until `record` marks them done
    busy: int = 0  # ids another request is logging right now: nothing is claimed, the batch is to be retried


@dataclass(frozen=True, slots=True)
class _Deferred:
    events: tuple[OnlineEvent, ...]
    event_ids: tuple[str, ...]
    claimed_in_store: bool


class Recovery:
    """One per worker process; thread-safe. `ready` says whether the online store is in line with the log
    (reachable, and rebuilt if it lost its data); the event path, the feed and the background check go
    through it."""

    def __init__(self, store: OnlineStore, log_dir: Path, *, window_seconds: float, backlog_limit: int,
                 poll_seconds: float, category_of: Callable[[str], str | None] | None = None,
                 pointer: Callable[[], str | None] | None = None, clock: Callable[[], float] = time.time,
                 takeover_seconds: float = CLAIM_TAKEOVER_SECONDS) -> None:
        self.store = store
        self.log_dir = Path(log_dir)
        self.window_seconds = window_seconds
        self.backlog_limit = backlog_limit
        self.poll_seconds = poll_seconds
        self._category_of = category_of
        self._pointer = pointer  # the bundle pointer of what this worker serves (republished after a rebuild)
        self._clock = clock
        self.takeover_seconds = takeover_seconds
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._claims = itertools.count()  # numbers each request's claims: owners are per request
        self._lock = threading.Lock()
        self._ready = False  # until the first check has found the store in line
        self._generation: str | None = None  # the store's generation this process last saw
        self._down_since: float | None = clock()  # wall clock
        self._backlog: deque[_Deferred] = deque()
        self._backlog_events = 0
        self._overflowed = False
        self._unrecorded_claims: set[str] = set()  # claimed in the store, not recorded, backlog dropped
        self._control_pending = False  # control rows logged while away: replayed when the store is back
        self._releases: list[tuple[tuple[str, ...], str]] = []  # (ids, owner) to give back once the store answers
        self._pending_pointer: str | None = None
        # event id -> (owner, monotonic time) of its pending claim; None once done (logged)
        self._seen: OrderedDict[str, tuple[str, float] | None] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        metrics.ONLINE_STORE_UP.set(0)
        metrics.BACKLOG.set(0)

    # -- state ------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def pointer_pending(self) -> bool:
        return self._pending_pointer is not None

    def note_failure(self) -> None:
        """A call to the store failed: stop writing to it until the check finds it in line again."""
        with self._lock:
            self._mark_down()

    def _mark_down(self) -> None:
        if self._ready:
            log.warning("online store unavailable: events are logged and wait for it; feeds come from the bundle")
        self._ready = False
        if self._down_since is None:
            self._down_since = self._clock()
        metrics.ONLINE_STORE_UP.set(0)

    # -- the event path ---------------------------------------------------------------------------------
    def claim(self, event_ids: Sequence[str]) -> Claim:
        """Which ids are this request's to log: claimed pending in the store when it is ready, and in this
        process's memory of recent ids (what deduplicates a retry against the same process during an outage).
        An id done in either is a duplicate; when any id is pending for another request (younger than
        `takeover_seconds`) nothing is claimed and `busy` says how many."""
        ids = list(event_ids)
        owner = f"{self._owner}:{next(self._claims)}"
        stored: list[ClaimOutcome] | None = None
        if self._ready:
            try:
                stored = self.store.claim_pending(ids, owner, self.takeover_seconds)
            except STORE_ERRORS:
                log.warning("online store unavailable for event id claims", exc_info=True)
                self.note_failure()
        mine = (ClaimOutcome.NEW, ClaimOutcome.TAKEN_OVER)
        finish: list[str] = []  # claimed in the store, though this process logged them already
        drop: list[str] = []  # claimed in the store, to give back
        now = time.monotonic()
        with self._lock:
            fresh: list[bool] = []
            busy = 0
            for k, event_id in enumerate(ids):
                outcome = None if stored is None else stored[k]
                ours = outcome in mine
                seen = event_id in self._seen
                pending = self._seen.get(event_id)
                if outcome is ClaimOutcome.DONE or (seen and pending is None):
                    if ours:
                        finish.append(event_id)
                    fresh.append(False)
                elif outcome is ClaimOutcome.BUSY or (pending is not None and now - pending[1] < self.takeover_seconds):
                    if ours:
                        drop.append(event_id)
                    busy += 1
                    fresh.append(False)
                else:
                    self._seen[event_id] = (owner, now)
                    self._seen.move_to_end(event_id)
                    fresh.append(True)
            if busy:
                for event_id, new in zip(ids, fresh, strict=True):
                    if new:
                        del self._seen[event_id]
                drop += [event_id for event_id, new in zip(ids, fresh, strict=True) if new and stored is not None]
                fresh = [False] * len(ids)
            while len(self._seen) > SEEN_IDS_KEPT:
                self._seen.popitem(last=False)
        if finish:
            try:
                self.store.finish_claims(finish)
            except STORE_ERRORS:
                log.warning("online store unavailable for event id claims", exc_info=True)
                self.note_failure()
        claim = Claim(fresh, stored is not None, owner, busy)
        if drop:
            self._release_in_store(drop, owner)
        return claim

    def release(self, event_ids: Sequence[str], claim: Claim) -> None:
        """Give back the pending claims of a batch the log refused, so its retry counts."""
        with self._lock:
            for event_id in event_ids:
                pending = self._seen.get(event_id)
                if pending is not None and pending[0] == claim.owner:  # (not one taken over since)
                    del self._seen[event_id]
        if claim.in_store:
            self._release_in_store(event_ids, claim.owner)

    def _release_in_store(self, event_ids: Sequence[str], owner: str) -> None:
        try:
            self.store.release_event_ids(event_ids, owner)
        except STORE_ERRORS:
            log.warning("online store unavailable: claims given back when it returns", exc_info=True)
            with self._lock:
                self._releases.append((tuple(event_ids), owner))
                self._mark_down()

    def record(self, events: Sequence[OnlineEvent], event_ids: Sequence[str], claim: Claim) -> bool:
        """Mark the claims of logged events done and apply the events to the store; False when they wait in
        the backlog instead (their claims are marked done when it is recorded)."""
        with self._lock:
            for event_id in event_ids:
                self._seen[event_id] = None
        while True:
            if self._ready:
                try:
                    if claim.in_store:
                        self.store.finish_claims(event_ids)
                    self.store.record(events)
                    return True
                except STORE_ERRORS:
                    log.warning("online store update failed for %d logged events", len(events), exc_info=True)
                    self.note_failure()
            with self._lock:
                if not self._ready:  # (it may have come back since the look above: then write after all)
                    self._defer(events, event_ids, claim)
                    return False

    def _defer(self, events: Sequence[OnlineEvent], event_ids: Sequence[str], claim: Claim) -> None:
        # Called with self._lock held. Past the limit the backlog is dropped for a replay of the outage.
        if not self._overflowed and self._backlog_events + len(events) > self.backlog_limit:
            log.warning("online store backlog over %d events: the outage will be replayed from the log",
                        self.backlog_limit)
            self._overflowed = True
            self._unrecorded_claims.update(i for d in self._backlog if d.claimed_in_store for i in d.event_ids)
            self._backlog.clear()
            self._backlog_events = 0
        if self._overflowed:
            if claim.in_store:
                self._unrecorded_claims.update(event_ids)
        else:
            self._backlog.append(_Deferred(tuple(events), tuple(event_ids), claim.in_store))
            self._backlog_events += len(events)
        metrics.BACKLOG.set(self._backlog_events)

    def apply_control(self, row: Mapping[str, object]) -> bool:
        """Apply a logged consent or erasure row to the store; False when it waits for the store."""
        while True:
            if self._ready:
                try:
                    apply_control(self.store, row)
                    return True
                except STORE_ERRORS:
                    log.warning("online store unavailable for a %s row", row.get("event_type"), exc_info=True)
                    self.note_failure()
            with self._lock:
                if not self._ready:
                    self._control_pending = True
                    return False

    def publish_pointer(self, pointer: str) -> bool:
        """Name the bundle every worker should serve; kept and written when the store is back if it is away."""
        try:
            self.store.set_bundle_pointer(pointer)
            self._pending_pointer = None
            return True
        except STORE_ERRORS:
            log.warning("online store unavailable: the bundle pointer is written when it returns", exc_info=True)
            self._pending_pointer = pointer
            self.note_failure()
            return False

    # -- bringing the store back in line ------------------------------------------------------------------
    def start(self) -> None:
        """A first check now (so a worker starts in line when it can), then one every `poll_seconds`."""
        self.check()
        self._thread = threading.Thread(target=self._run, name="online-recovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception:  # the check must outlive any one failure
                log.exception("online store check failed")

    def check(self) -> None:
        """Find out whether the store is in line, and bring it in line when it is back."""
        try:
            generation = self.store.generation()
            emptied = generation is None
            if generation is None:
                self.note_failure()
                if not self._rebuild():
                    return  # another worker rebuilds it; look again at the next check
                generation = self.store.generation()
                if generation is None:
                    return
            rebuilt = emptied or (self._generation is not None and generation != self._generation)
            if rebuilt and self._generation is not None:
                log.warning("the online store was rebuilt from the event log (generation %s)", _token(generation))
            if self._ready and not rebuilt:
                return
            self._catch_up(rebuilt)
            if self._pending_pointer is not None:
                self.store.set_bundle_pointer(self._pending_pointer)
                self._pending_pointer = None
            self._generation = generation
        except STORE_ERRORS:
            self.note_failure()
            return

    def _rebuild(self) -> bool:
        """Replay the log of the online window into the emptied store, when this worker holds the lock."""
        began = time.perf_counter()
        stats = rebuild(self.store, self.log_dir, self._clock() - self.window_seconds, owner=self._owner,
                        category_of=self._category_of, pointer=self._pointer)
        if stats is None:
            return False
        if stats.events or stats.control:
            log.warning("online store rebuilt from the event log: %d events, %d consent/erasure rows in %.1f s",
                        stats.events, stats.control, time.perf_counter() - began)
        return True

    def _catch_up(self, rebuilt: bool) -> None:
        """Record the backlog (and give back failed claims), then declare the store ready.

        Deferred events are claimed in the store first, except those it had claimed already (when only
        recording failed) and the store kept its data: an id another worker logged as well, or that a rebuild
        replayed, is then not claimed again and not recorded twice."""
        with self._lock:
            releases, self._releases = self._releases, []
        for event_ids, owner in releases:
            self.store.release_event_ids(event_ids, owner)
        while True:
            with self._lock:
                if not self._backlog and not self._overflowed:
                    control = self._control_pending
                    self._control_pending = False
                    if not control:
                        self._set_ready()
                        return
                    entry = None
                else:
                    entry = self._backlog[0] if self._backlog else None
                    control = False
            if control:
                self._replay_control()
                continue
            if entry is None:
                self._replay_overflow(rebuilt)
                continue
            recorded = self._flush(entry, rebuilt)
            with self._lock:
                if self._backlog and self._backlog[0] is entry:
                    self._backlog.popleft()
                    self._backlog_events -= len(entry.events)
                metrics.BACKLOG.set(self._backlog_events)
            metrics.RECOVERED.labels(how="backlog").inc(recorded)

    def _set_ready(self) -> None:
        # Called with self._lock held, the backlog empty: from here on requests write to the store again.
        if self._down_since is not None and self._generation is not None:  # (not at the first check)
            log.warning("online store back in line after %.1f s", self._clock() - self._down_since)
        self._ready = True
        self._down_since = None
        metrics.ONLINE_STORE_UP.set(1)

    def _flush(self, entry: _Deferred, rebuilt: bool) -> int:
        if entry.claimed_in_store and not rebuilt:
            self.store.finish_claims(entry.event_ids)
            self.store.record(entry.events)
            return len(entry.events)
        fresh = self.store.claim_event_ids(entry.event_ids)
        events = [event for event, new in zip(entry.events, fresh, strict=True) if new]
        self.store.record(events)
        return len(events)

    def _replay_overflow(self, rebuilt: bool) -> None:
        """The backlog overflowed: this worker's share of the outage is read back from the log instead."""
        with self._lock:
            since = (self._down_since if self._down_since is not None else self._clock()) - OVERFLOW_SLACK_SECONDS
            unrecorded = set() if rebuilt else set(self._unrecorded_claims)
        events, _ = read_events(self.log_dir, since, self._category_of)
        recorded = 0
        for start in range(0, len(events), 1_000):
            part = events[start : start + 1_000]
            ids = [key or "" for key, _ in part]
            fresh = self.store.claim_event_ids([i for i in ids if i])
            flags = iter(fresh)
            keep = [event for (key, event) in part if (next(flags) if key else True) or key in unrecorded]
            self.store.record(keep)
            recorded += len(keep)
        metrics.RECOVERED.labels(how="overflow").inc(recorded)
        log.warning("online store: %d events of the outage replayed from the event log", recorded)
        with self._lock:
            self._overflowed = False
            self._unrecorded_claims.clear()
            self._control_pending = True  # and the control rows, in their order

    def _replay_control(self) -> None:
        """Every consent and erasure row again, in log order: the final state whatever order workers sent."""
        for row in read_control(self.log_dir):
            apply_control(self.store, row)


@contextlib.contextmanager
def _held(store: OnlineStore, owner: str) -> Iterator[bool]:
    """The rebuild lock, extended every third of its time to live while held; yields whether it is held."""
    if not store.acquire_lock(REBUILD_LOCK, owner, LOCK_TTL_SECONDS):
        yield False
        return
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(LOCK_TTL_SECONDS / 3):
            try:
                store.acquire_lock(REBUILD_LOCK, owner, LOCK_TTL_SECONDS)
            except STORE_ERRORS:
                log.warning("could not extend the rebuild lock", exc_info=True)

    keeper = threading.Thread(target=keep, name="rebuild-lock", daemon=True)
    keeper.start()
    try:
        yield True
    finally:
        stop.set()
        keeper.join(timeout=5)
        store.release_lock(REBUILD_LOCK, owner)


def rebuild(store: OnlineStore, log_dir: Path, since: float | None, *, owner: str,
            category_of: Callable[[str], str | None] | None = None, pointer: Callable[[], str | None] | None = None,
            force: bool = False) -> ReplayStats | None:
    """Replay the event log (events at or after `since`, every control row) into a store that lost its data,
    under the rebuild lock, then write a new generation so no other worker replays it again.

    None when another process holds the lock. A store that has a generation already is left alone (another
    worker rebuilt it first) unless `force` (an operator's replay into a store that lost only part of its
    data). `pointer` names the bundle to write as the bundle pointer when the store has none."""
    with _held(store, owner) as held:
        if not held:
            return None
        if store.generation() is not None and not force:
            return ReplayStats(0, 0, 0)
        started = time.time()
        stats = replay(log_dir, store, since, category_of=category_of)
        named = pointer() if pointer is not None else None
        if named is not None and store.bundle_pointer() is None:
            store.set_bundle_pointer(named)
        store.set_generation(orjson.dumps({"token": uuid.uuid4().hex, "built_at": started, "events": stats.events,
                                           "control": stats.control}).decode())
        metrics.REBUILDS.inc()
        metrics.RECOVERED.labels(how="rebuild").inc(stats.events)
        return stats


def _token(generation: str) -> str:
    try:
        value = orjson.loads(generation)
    except orjson.JSONDecodeError:
        return generation
    return str(value.get("token", generation)) if isinstance(value, dict) else generation

