"""Events in: validate a batch row by row, write the good rows to the durable log, then to the online store.

Order matters. A row is acknowledged only once the log file holding it is fsync'ed (the log is what
training reads and what the online store is rebuilt from); the store is updated after, and a failure
there does not un-acknowledge anything. Ingestion is idempotent on `event_id`: ids are claimed pending
before the append and done after it, so a retried batch finds its ids done and is counted as duplicates, not
applied twice; a retry that finds them pending waits (`EventsInFlightError`) until their request logged them, or,
when its process died before logging them, takes them over and logs them itself. The store is reached through an
`OnlineWriter` (`serving.recovery.Recovery`), which keeps events flowing while the store is away.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import pandas as pd

from features.eventlog import EventLog
from features.store import OnlineEvent
from features.tables import records_table
from features.validation import check_events
from serving.recovery import Claim

_OPTIONAL = ("target_user_id", "referrer_id", "session_id", "request_id", "quantity", "price")


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int
    reason: str


class OnlineWriter(Protocol):
    """The online store as ingestion sees it: claims that make a retry a no-op, and the projection."""

    def claim(self, event_ids: Sequence[str]) -> Claim: ...

    def release(self, event_ids: Sequence[str], claim: Claim) -> None: ...

    def record(self, events: Sequence[OnlineEvent], event_ids: Sequence[str], claim: Claim) -> bool:
        """Apply logged events; False when they could not be applied now (they will be)."""
        ...


class EventsInFlightError(Exception):
    """Some of the batch's event ids are being logged by another request right now: nothing was logged nor
    acknowledged, and a retry in a few seconds is answered (as duplicates, or accepted if that request died)."""

    def __init__(self, busy: int) -> None:
        super().__init__(f"{busy} event(s) of the batch are being written by another request; retry")
        self.busy = busy


@dataclass(frozen=True, slots=True)
class IngestResult:
    accepted: int  # new events written to the log and acknowledged
    duplicates: int  # rows already ingested (same event_id) or repeated inside the batch
    rejected: tuple[Rejected, ...]
    store_updated: bool  # False when the online store could not be updated now (the log has the events)


def _named(value: object) -> str | None:
    """An optional user id column's value: the id, or None when it is missing or empty."""
    return value if isinstance(value, str) and value else None


def _log_rows(accepted: pd.DataFrame) -> list[dict[str, object]]:
    """Accepted events as the log stores them: the contract's columns, time in ISO 8601 UTC."""
    rows: list[dict[str, object]] = []
    stamps = accepted["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").tolist()
    columns = {c: accepted[c].tolist() for c in ("event_id", "user_id", "item_id", "event_type", *_OPTIONAL)}
    for k, stamp in enumerate(stamps):
        row: dict[str, object] = {"event_id": columns["event_id"][k], "user_id": columns["user_id"][k],
                                  "item_id": columns["item_id"][k], "event_type": columns["event_type"][k],
                                  "timestamp": stamp}
        for name in _OPTIONAL:
            value = columns[name][k]
            if value is not None and not (isinstance(value, float) and value != value):
                row[name] = value
        rows.append(row)
    return rows


def ingest(
    records: Sequence[Mapping[str, object]],
    *,
    event_types: Sequence[str],
    online: OnlineWriter,
    event_log: EventLog,
    category_of: Callable[[str], str | None],
) -> IngestResult:
    """Validate, deduplicate, log (fsync), then project into the store. Raises `EventLogError` when the
    log cannot take the batch, `EventsInFlightError` when another request is logging some of its ids; then nothing
    was acknowledged (nor written) and a retry is safe."""
    raw = records_table([dict(r) for r in records], "request")
    check = check_events(raw, event_types)
    rejected = tuple(
        Rejected(int(row), str(reason))
        for row, reason in zip(check.rejects["row"].tolist(), check.rejects["reason"].tolist(), strict=True)
    )
    accepted = check.accepted
    if accepted.empty:
        return IngestResult(0, check.duplicates, rejected, True)
    event_ids = accepted["event_id"].astype(str).tolist()
    claim = online.claim(event_ids)
    if claim.busy:
        raise EventsInFlightError(claim.busy)
    new = accepted.loc[claim.fresh].reset_index(drop=True)
    duplicates = check.duplicates + (len(accepted) - len(new))
    if new.empty:
        return IngestResult(0, duplicates, rejected, True)
    new_ids = [i for i, keep in zip(event_ids, claim.fresh, strict=True) if keep]
    try:
        event_log.append(_log_rows(new))
    except Exception:
        online.release(new_ids, claim)  # nothing acknowledged: a retry must count
        raise
    online_events = [
        OnlineEvent(user, item, kind, ts, category_of(item), _named(target), _named(referrer))
        for user, item, kind, ts, target, referrer in zip(
            new["user_id"].tolist(), new["item_id"].tolist(), new["event_type"].tolist(),
            (new["ts"].astype("datetime64[ns, UTC]").astype("int64") / 1e9).tolist(),
            new["target_user_id"].tolist(), new["referrer_id"].tolist(), strict=True,
        )
    ]
    recorded = online.record(online_events, new_ids, claim)
    return IngestResult(len(new), duplicates, rejected, recorded)
