"""Whether a user may be personalized, put in a marketing segment or shown to friends: the one check every
path makes (feeds, rank, social proof, segments, their pages and exports, share suggestions, batch jobs).

Erasures and consent are rows of the durable event log; each process reads them into a `ControlLedger`, and
the online store holds a projection that may lag or, after a Redis restart, be empty. The two are combined:

- erased when either says so; an erased user has no consent left for anything;
- a purpose's consent is the latest statement about it. Every statement reaches the log before the store, so
  when the two disagree the ledger is refreshed (once per check) and then decides; a purpose the ledger has no
  statement about is the store's answer, and one nobody stated is given;
- when the store is down, or there is none (a batch job without Redis), the ledger alone decides.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from features.ledger import ControlLedger, Statement
from features.online import STORE_ERRORS, open_store
from features.store import CONSENT_PURPOSES, OnlineStore

log = logging.getLogger(__name__)

_NONE_GIVEN = dict.fromkeys(CONSENT_PURPOSES, False)


@dataclass(frozen=True, slots=True)
class Standing:
    """What a user allows: erased, and consent per purpose (every purpose; all withheld once erased)."""

    erased: bool
    consent: dict[str, bool]

    def allows(self, purposes: Iterable[str]) -> bool:
        return not self.erased and all(self.consent.get(p, True) for p in purposes)


class Privacy:
    """The ledger and the online store (None: the ledger alone) answering together."""

    def __init__(self, ledger: ControlLedger, store: OnlineStore | None) -> None:
        self.ledger = ledger
        self.store = store

    def clock(self) -> float:
        return self.ledger.clock()

    def standings(self, user_ids: Sequence[str]) -> list[Standing]:
        """Each user's standing: the ledger with the store (two round trips), or the ledger alone."""
        if not user_ids:
            return []
        self.ledger.maybe_refresh()
        answers = self._store_answers(user_ids)
        if answers is None:
            return self.from_ledger(user_ids)
        erased, consents = answers
        return self.combine(user_ids, erased, consents, self.clock())

    def _store_answers(self, user_ids: Sequence[str]) -> tuple[list[bool], list[dict[str, bool]]] | None:
        """The store's tombstones and consent (one round trip); None without a store or while it is down."""
        if self.store is None:
            return None
        try:
            return self.store.standings(user_ids)
        except STORE_ERRORS:
            log.warning("online store unavailable: consent and erasure from the event log alone", exc_info=True)
            return None

    def standing(self, user_id: str) -> Standing:
        return self.standings([user_id])[0]

    def allowed(self, user_ids: Sequence[str], purposes: Sequence[str]) -> list[bool]:
        """Per user: not erased, and none of `purposes` withheld.

        The same answers as `standings`, without building a standing per user: segments and exports ask
        this of thousands to millions of users, almost none of whom ever stated anything. A user the ledger
        holds statements about goes through `combine` (which may refresh the ledger); for the others the
        store's consent is the answer, as `combine` would give it.
        """
        if not user_ids:
            return []
        self.ledger.maybe_refresh()
        answers = self._store_answers(user_ids)
        if answers is None:
            return [standing.allows(purposes) for standing in self.from_ledger(user_ids)]
        store_erased, store_consents = answers
        answered_at = self.clock()
        ledger_erased = self.ledger.erased(user_ids)
        stated = self.ledger.statements(user_ids)
        rows = zip(ledger_erased, store_erased, stated, store_consents, strict=True)
        # one comprehension per batch (a user with statements is False here and decided below, with the ledger)
        if len(purposes) == 1:  # marketing, the usual case: no generator per user
            purpose = purposes[0]
            out = [not (gone or in_store or said) and bool(stored.get(purpose, True))
                   for gone, in_store, said, stored in rows]
        else:
            out = [not (gone or in_store or said) and all(stored.get(p, True) for p in purposes)
                   for gone, in_store, said, stored in rows]
        stated_users = [at for at, (gone, in_store, said)
                        in enumerate(zip(ledger_erased, store_erased, stated, strict=True))
                        if said and not (gone or in_store)]
        if stated_users:
            settled = self.combine([user_ids[at] for at in stated_users], [False] * len(stated_users),
                                   [store_consents[at] for at in stated_users], answered_at)
            for at, standing in zip(stated_users, settled, strict=True):
                out[at] = standing.allows(purposes)
        return out

    def from_ledger(self, user_ids: Sequence[str]) -> list[Standing]:
        """The ledger's answer alone (the store is down or absent)."""
        self.ledger.maybe_refresh()
        erased = self.ledger.erased(user_ids)
        stated = self.ledger.statements(user_ids)
        return [_standing(gone, {p: s.given for p, s in said.items()}, dict.fromkeys(CONSENT_PURPOSES, True))
                for gone, said in zip(erased, stated, strict=True)]

    def combine(self, user_ids: Sequence[str], store_erased: Sequence[bool], store_consents: Sequence[dict[str, bool]],
                answered_at: float) -> list[Standing]:
        """Standings from the store's answers (read by the caller, done at clock time `answered_at`) and the
        ledger; the ledger is refreshed first when it disagrees with the store and may not have read yet
        what the store reflects."""
        self.ledger.maybe_refresh()
        out = self._combine(user_ids, store_erased, store_consents)
        if out is None:
            if self.ledger.refreshed_at < answered_at:
                self.ledger.refresh()
            out = self._combine(user_ids, store_erased, store_consents, settle=True)
        assert out is not None
        return out

    def _combine(self, user_ids: Sequence[str], store_erased: Sequence[bool],
                 store_consents: Sequence[dict[str, bool]], settle: bool = False) -> list[Standing] | None:
        """None when the ledger and the store disagree about a stated purpose (and `settle` is not set)."""
        out: list[Standing] = []
        ledger_erased = self.ledger.erased(user_ids)
        stated = self.ledger.statements(user_ids)
        for gone, in_store, said, stored in zip(ledger_erased, store_erased, stated, store_consents, strict=True):
            if gone or in_store:
                out.append(Standing(True, dict(_NONE_GIVEN)))
                continue
            if not settle and _disagree(said, stored):
                return None
            out.append(_standing(False, {p: s.given for p, s in said.items()}, stored))
        return out


def _disagree(said: dict[str, Statement], stored: dict[str, bool]) -> bool:
    return any(stored.get(purpose, True) != statement.given for purpose, statement in said.items())


def _standing(erased: bool, said: dict[str, bool], otherwise: dict[str, bool]) -> Standing:
    if erased:
        return Standing(True, dict(_NONE_GIVEN))
    return Standing(False, {p: said.get(p, otherwise.get(p, True)) for p in CONSENT_PURPOSES})


def batch_privacy(redis_url: str | None, prefix: str, event_log: Path) -> Privacy:
    """What a batch job (`segment`, `recommend`) must honour: the event log's ledger, with the Redis store
    when there is one."""
    return Privacy(ControlLedger(event_log), open_store(redis_url, prefix) if redis_url is not None else None)
