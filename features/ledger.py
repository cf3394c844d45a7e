"""The control ledger: who was erased and the latest consent statement of every user, read from the event
log's `control/` files and kept current by reading only what was appended since (each file tailed by offset).

It lets a process honour erasures and consent without the online store, which keeps nothing on disk and
forgets them after a restart until a replay. Each process keeps its own ledger: rows it appended itself count
at once (`note`), rows of other processes at the next refresh (at most `max_age_seconds` later, or sooner
when `refresh` is called). A quick refresh stats the files of the last hours only (writers move to a new
file every hour) and lists the folder again only when it changed; a full one reads every file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from features.eventlog import CONSENT, CONTROL, ERASE, epoch_seconds, hour_of_file, log_files
from features.store import CONSENT_PURPOSES

log = logging.getLogger(__name__)

SETTLED_SECONDS = 2 * 3600.0  # a file whose hour is this far back is no longer written to (clock skew aside)


@dataclass(frozen=True, slots=True)
class Statement:
    """One purpose's latest consent statement: when, and whether it was given."""

    ts: float
    given: bool


@dataclass(slots=True)
class _Tail:
    inode: int
    offset: int  # bytes read: the end of the last complete line


class ControlLedger:
    """Erasures and consent statements of the log at `directory` (the folder holding `control/`).

    Reads take no lock: they are single dict lookups, and a refresh replaces values rather than changing
    them. One refresh runs at a time.
    """

    def __init__(self, directory: Path, *, max_age_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = Path(directory)
        self.max_age_seconds = max_age_seconds
        self.clock = clock
        self._refreshing = threading.Lock()
        self._tails: dict[Path, _Tail] = {}
        self._listing: tuple[int | None, list[Path]] | None = None  # (folder mtime, files still written to)
        self._erased: dict[str, float] = {}  # user -> time of the (first) erasure
        self._consent: dict[str, dict[str, Statement]] = {}  # user -> purpose -> latest statement
        self.refreshed_at = -float("inf")  # clock time the last refresh started: rows written before are in
        self.refresh(full=True)

    # -- reading the log ---------------------------------------------------------------------------------
    def refresh(self, *, full: bool = False) -> None:
        """Read what the control files gained since the last refresh (new files whole). A quick refresh
        looks at the files of the last hours, and lists the folder again only when it changed; a full one
        (at start, and from time to time in the background) looks at every file."""
        started = self.clock()
        with self._refreshing:
            try:
                stamp: int | None = os.stat(self.directory / CONTROL).st_mtime_ns
            except FileNotFoundError:
                stamp = None
            listing = self._listing
            if full or listing is None or listing[0] != stamp:
                paths = log_files(self.directory, (CONTROL,))
                unread = [p for p in paths if p not in self._tails]
                for path in paths if full or listing is None else unread + listing[1]:
                    self._read_tail(path)
                settled = datetime.fromtimestamp(time.time() - SETTLED_SECONDS, UTC).strftime("%Y%m%d%H")
                self._listing = (stamp, [p for p in paths if hour_of_file(p) >= settled])
            else:
                for path in listing[1]:
                    self._read_tail(path)
            self.refreshed_at = max(self.refreshed_at, started)

    def maybe_refresh(self) -> None:
        """Refresh when the last one is older than `max_age_seconds`; skip when another thread is at it."""
        if self.clock() - self.refreshed_at < self.max_age_seconds:
            return
        if self._refreshing.locked():
            return  # that refresh brings the news; answer from what is known meanwhile
        self.refresh()

    def _read_tail(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            stat = os.fstat(fd)
            tail = self._tails.get(path)
            if tail is None or tail.inode != stat.st_ino or stat.st_size < tail.offset:
                if tail is not None:  # cut back or replaced: read it again (applying a row twice changes nothing)
                    log.warning("control ledger: %s changed under its offset, reading it again", path.name)
                tail = self._tails[path] = _Tail(stat.st_ino, 0)
            if stat.st_size == tail.offset:
                return
            data = os.pread(fd, stat.st_size - tail.offset, tail.offset)
        finally:
            os.close(fd)
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next refresh
        for line in complete.splitlines():
            if line.strip():
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    log.warning("control ledger: skipped a line that is not JSON in %s", path.name)
                    continue
                if isinstance(row, dict):
                    self._apply(row)
        tail.offset += len(complete)

    def note(self, row: Mapping[str, object]) -> None:
        """A control row this process has just made durable: in force before the next refresh reads it."""
        self._apply(row)

    def _apply(self, row: Mapping[str, object]) -> None:
        user_id = row.get("user_id")
        if not isinstance(user_id, str):
            return
        ts = epoch_seconds(row.get("timestamp"))
        if row.get("event_type") == ERASE:
            when = ts if ts is not None else time.time()
            self._erased[user_id] = min(when, self._erased.get(user_id, when))
            return
        purposes = row.get("purposes")
        if row.get("event_type") != CONSENT or not isinstance(purposes, Mapping) or ts is None:
            return
        stated = dict(self._consent.get(user_id, {}))
        for purpose, given in purposes.items():
            if purpose not in CONSENT_PURPOSES:
                continue
            before = stated.get(purpose)
            # The latest statement counts; of two at the same instant, the one withholding consent.
            if before is None or ts > before.ts or (ts == before.ts and not given):
                stated[purpose] = Statement(ts, bool(given))
        self._consent[user_id] = stated  # replaced whole: a reader sees the old or the new statements

    # -- answers -------------------------------------------------------------------------------------
    def erased(self, user_ids: Sequence[str]) -> list[bool]:
        erased = self._erased
        return [user_id in erased for user_id in user_ids]

    def statements(self, user_ids: Sequence[str]) -> list[dict[str, Statement]]:
        """Per user, the latest statement of each purpose they said anything about."""
        consent = self._consent
        return [consent.get(user_id, {}) for user_id in user_ids]

    def erasures(self) -> dict[str, float]:
        """Every erased user with the time of the erasure."""
        return dict(self._erased)
