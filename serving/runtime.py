"""The running service's moving parts: the recommender of the current bundle, the online store and the
event log, and how a new bundle reaches every worker process.

A reload loads and verifies the new bundle beside the old one and swaps a single reference, so a request
sees one bundle from start to end and a refused bundle changes nothing. The bundle to serve is named in
the online store (`bundle_pointer`); every worker checks it every `reload_poll_seconds` and follows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from features.eventlog import EventLog
from features.ledger import ControlLedger
from features.online import STORE_ERRORS
from features.store import OnlineStore, UserSnapshot
from features.vocab import Vocabulary
from serving import metrics
from serving.merchandising import Rule, RuleBook
from serving.privacy import Privacy
from serving.recommender import Recommender, UserContext, new_ties, newer_activity, newer_than, unread
from serving.recovery import Recovery
from serving.related import ItemLists
from serving.settings import ServingSettings
from training.bundle import BundleError, load_bundle

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Loaded:
    recommender: Recommender
    path: Path


@dataclass(frozen=True, slots=True)
class UserView:
    context: UserContext | None
    consent: dict[str, bool]
    degraded: bool  # the online store did not answer: the feed comes from the bundle alone


def pointer_for(path: Path, version: str) -> str:
    """The shared name of the bundle to serve: its directory and the version found there when verified
    (a bundle rewritten in place under the same path is a new version, so workers notice it too)."""
    return orjson.dumps({"path": str(path), "version": version}).decode()


def read_pointer(pointer: str) -> tuple[Path, str | None]:
    try:
        value = orjson.loads(pointer)
    except orjson.JSONDecodeError:
        return Path(pointer), None  # a bare path, as an operator may set it by hand
    if isinstance(value, dict) and "path" in value:
        version = value.get("version")
        return Path(str(value["path"])), str(version) if version is not None else None
    return Path(pointer), None


class Service:
    def __init__(self, settings: ServingSettings, store: OnlineStore, event_log: EventLog,
                 app_state: Any) -> None:
        self.settings = settings
        self.store = store
        self.event_log = event_log
        self._app_state = app_state  # FastAPI's app.state: routers read `recommender` and `store` there
        self._current: Loaded | None = None
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._rules = RuleBook()
        self._overlay_checked = -float("inf")
        self.recovery = Recovery(store, event_log.directory, window_seconds=settings.recovery_window_seconds,
                                 backlog_limit=settings.recovery_backlog_events,
                                 poll_seconds=settings.recovery_poll_seconds, category_of=self._category_of,
                                 pointer=self._pointer, takeover_seconds=settings.claim_takeover_seconds)
        # Consent and erasures from the event log, so they hold when the store forgot them (serving.privacy)
        self.privacy = Privacy(ControlLedger(event_log.directory, max_age_seconds=settings.control_refresh_seconds),
                               store)
        app_state.store = store
        app_state.privacy = self.privacy
        app_state.recommender = None

    @property
    def loaded(self) -> Loaded | None:
        return self._current

    @property
    def recommender(self) -> Recommender | None:
        current = self._current
        return current.recommender if current is not None else None

    def _category_of(self, item_id: str) -> str | None:
        recommender = self.recommender
        return recommender.category_of(item_id) if recommender is not None else None

    def _pointer(self) -> str | None:
        current = self._current
        return pointer_for(current.path, current.recommender.version) if current is not None else None

    def install(self, recommender: Recommender, path: Path) -> None:
        try:
            recommender.catalog.refresh(self.store)  # catalog changes made through the API since training
        except STORE_ERRORS:
            log.warning("online store unavailable: catalog changes are applied when it answers", exc_info=True)
        lists = ItemLists(recommender.bundle, recommender.catalog)  # similar-item index built before the swap
        with self._swap_lock:
            previous = self._current
            self._current = Loaded(recommender, path)
            self._app_state.catalog = recommender.catalog
            self._app_state.item_lists = lists
            self._app_state.recommender = recommender
        metrics.set_bundle(recommender.version, previous.recommender.version if previous else None)

    def reload(self, path: Path) -> tuple[str, str | None]:
        """Load, verify and swap in the bundle at `path`, then name it for every worker.

        Raises `BundleError` (and keeps the current bundle) when the bundle fails its checks.
        """
        previous = self.recommender.version if self.recommender is not None else None
        try:
            recommender = Recommender(load_bundle(path))
        except BundleError:
            metrics.RELOADS.labels(outcome="refused").inc()
            raise
        self.install(recommender, path)
        self.recovery.publish_pointer(pointer_for(path, recommender.version))  # kept for later if the store is away
        metrics.RELOADS.labels(outcome="loaded").inc()
        return recommender.version, previous

    def follow_pointer(self) -> None:
        """Serve the bundle the store names, when it differs from this worker's."""
        if self.recovery.pointer_pending:
            return  # this worker reloaded while the store was away: the store's pointer is the stale one
        pointer = self.store.bundle_pointer()
        if pointer is None:
            return
        path, version = read_pointer(pointer)
        current = self._current
        if current is not None and current.path == path and version in (None, current.recommender.version):
            return
        try:
            self.install(Recommender(load_bundle(path)), path)
            log.info("worker follows the bundle pointer to %s", pointer)
        except BundleError as exc:  # the worker that set the pointer had verified it: the copy changed since
            log.error("bundle named by the pointer is refused, still serving the old one: %s", exc)

    def start(self) -> None:
        self.recovery.start()
        self._poller = threading.Thread(target=self._poll, name="bundle-pointer", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        self.recovery.stop()
        if self._poller is not None:
            self._poller.join(timeout=5)
        self.event_log.close()

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.reload_poll_seconds):
            try:
                self.follow_pointer()
            except Exception:  # a store outage must not kill the poller
                log.exception("checking the bundle pointer failed")

    def merchandising(self, recommender: Recommender) -> list[Rule]:
        """The rules in force now, with the catalog brought up to date; both read at most once per
        `overlay_refresh_seconds` from the store. A store outage keeps the last rules and catalog."""
        now = time.monotonic()
        if now - self._overlay_checked >= self.settings.overlay_refresh_seconds:
            self._overlay_checked = now
            try:
                recommender.catalog.refresh(self.store)
                self._rules.refresh(self.store)
            except STORE_ERRORS:
                log.warning("online store unavailable: catalog changes and rules as last read", exc_info=True)
        return self._rules.active(datetime.now(UTC))

    def visible_in_social_proof(self, user_ids: list[str]) -> list[bool]:
        """Who may appear in other shoppers' social proof: not erased, `social_proof` consent not withheld
        (serving.privacy: the event log's ledger with the store, the ledger alone while the store is away)."""
        return self.privacy.allowed(user_ids, ["social_proof"])

    def _context(self, snapshot: UserSnapshot, since: float, friends: Sequence[str], known: Vocabulary | None
                 ) -> UserContext:
        """The user's context: their own records, and the shares to them, the referrals they came through and
        what their friends bought and shared newer than the bundle (`since`) that may be used: not from an
        erased sharer or referrer, not from a friend erased or withholding `social_proof` (what a friend bought
        shows in the feed). One more store round trip, only when there is any.

        Whoever shared with the user or referred them is one of the people they see from then on; what those
        the snapshot did not read (not among `friends`, and `known` to the bundle) bought and shared takes one
        more round trip."""
        shared, bought = newer_than(snapshot.shared_to, snapshot.friends_purchased, since)
        their_shares = newer_activity(snapshot.friends_shared, since)
        referred = {referrer: ts for referrer, ts in snapshot.referred_by.items() if ts >= since}
        people = list(dict.fromkeys([*(e.user_id for e in shared), *referred, *bought, *their_shares]))
        if not people:
            return UserContext(snapshot.recent, snapshot.purchased)
        standing = dict(zip(people, self.privacy.standings(people), strict=True))
        shared = [e for e in shared if not standing[e.user_id].erased]
        referred = {referrer: ts for referrer, ts in referred.items() if not standing[referrer].erased}
        ties = [] if known is None else [t for t in unread(new_ties(shared, referred, since), friends, known)
                                         if standing[t].allows(["social_proof"])]
        if ties:
            try:
                ties_bought, ties_shared = self.store.activity_of(ties)
                bought.update(newer_activity(ties_bought, since))
                their_shares.update(newer_activity(ties_shared, since))
            except STORE_ERRORS:  # the feed goes on without them, as if they had done nothing since
                log.warning("online store unavailable: activity of new ties not read", exc_info=True)

        def allowed(activity: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
            return {friend: items for friend, items in activity.items() if standing[friend].allows(["social_proof"])}

        return UserContext(snapshot.recent, snapshot.purchased, shared, allowed(bought), referred,
                           allowed(their_shares))

    def user_view(self, user_id: str) -> UserView:
        """The user's online context and consent (an erased user has none: no personalization); degraded
        (bundle only, consent from the event log) when the store fails or is not in line with the log yet."""
        if self.recovery.ready:
            recommender = self.recommender
            friends = recommender.friend_ids(user_id) if recommender is not None else []
            try:
                snapshot = self.store.snapshot(user_id, friends)  # one round trip
            except STORE_ERRORS:
                log.warning("online store unavailable, answering from the bundle", exc_info=True)
                self.recovery.note_failure()
            else:
                standing = self.privacy.combine([user_id], [snapshot.erased], [snapshot.consent],
                                                self.privacy.clock())[0]
                if not standing.allows(["personalization"]):
                    return UserView(None, standing.consent, False)
                since = recommender.bundle.state.cutoff_seconds if recommender is not None else float("inf")
                context = self._context(snapshot, since, friends,
                                        recommender.bundle.users if recommender is not None else None)
                return UserView(context, standing.consent, False)
        return UserView(None, self.privacy.from_ledger([user_id])[0].consent, True)
