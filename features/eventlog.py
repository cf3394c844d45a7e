"""The durable event log: JSON Lines files, one per process and hour, that `train --data` reads as events.

An appended batch is acknowledged only after its file is flushed and fsync'ed (one fsync per batch: group
commit); a batch that fails is cut off again, so a file never holds half a batch. Consent changes and
erasures go to a sibling `control/` folder that the events loader does not read. The online store is a
projection of this log: `replay` rebuilds it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from features.store import CONSENT_PURPOSES, EVENT_ID_TTL_SECONDS, OnlineEvent, OnlineStore

log = logging.getLogger(__name__)

EVENTS = "events"  # DIR/events/ is a table folder the loader reads (features.tables.table_files)
CONTROL = "control"  # DIR/control/ holds consent and erasure rows; no loader reads it as events
CONSENT = "consent"
ERASE = "erase"
CONTROL_TYPES = frozenset({CONSENT, ERASE})
SUFFIX = ".jsonl"
_REPLAY_BATCH = 1_000


class EventLogError(RuntimeError):
    """A batch could not be made durable; none of it was acknowledged (nor left in the file)."""


def consent_row(user_id: str, purposes: Mapping[str, bool], ts: float) -> dict[str, object]:
    """The log row of a consent change (only the purposes given change)."""
    return {"event_type": CONSENT, "user_id": user_id, "purposes": {p: bool(v) for p, v in purposes.items()},
            "timestamp": _iso(ts)}


def erase_row(user_id: str, ts: float) -> dict[str, object]:
    """The log row of an erasure request."""
    return {"event_type": ERASE, "user_id": user_id, "timestamp": _iso(ts)}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def epoch_seconds(value: object) -> float | None:
    """A log timestamp (epoch seconds, or ISO 8601 with a zone) as epoch seconds; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "zZ" else text)
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None


def _check_control(row: Mapping[str, object]) -> None:
    # The messages name the problem, never the row: it came from a request, and exceptions end up in logs.
    user_id = row.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"{row.get('event_type')} row without a user_id")
    if row.get("event_type") == CONSENT and not isinstance(row.get("purposes"), Mapping):
        raise ValueError("consent row without a purposes object")


def _safe_host() -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()) or "host"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(fd: int) -> int:
    """Truncate a last line that has no newline (a write cut short by a crash); bytes dropped."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - 65_536)
        chunk = os.pread(fd, end - start, start)
        if end == size and chunk.endswith(b"\n"):
            return 0
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    os.ftruncate(fd, end)
    os.fsync(fd)
    return size - end


def repair(directory: Path) -> int:
    """Cut torn last lines of every log file no live writer holds (a writer keeps an exclusive lock)."""
    dropped = 0
    for path in log_files(Path(directory)):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer owns it
            cut = _cut_torn_tail(fd)
            if cut:
                log.warning("event log: cut a torn last line of %d bytes from %s", cut, path)
            dropped += cut
        finally:
            os.close(fd)  # releases the lock
    return dropped


def log_files(directory: Path, families: Sequence[str] = (EVENTS, CONTROL)) -> list[Path]:
    """The log's files of these families, by name."""
    return [p for family in families if (directory / family).is_dir()
            for p in sorted((directory / family).glob(f"{family}-*{SUFFIX}")) if p.is_file()]


def hour_of_file(path: Path) -> str:
    """The UTC hour (YYYYMMDDHH) a log file's name carries."""
    return path.name[: -len(SUFFIX)].rsplit("-", 1)[-1]


class EventLog:
    """Appends batches of rows to this process's file of the current hour (UTC, wall clock).

    Thread-safe; after a fork the child opens files of its own (the name carries the process id).
    """

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self._clock = clock
        self._host = _safe_host()
        self._lock = threading.Lock()
        self._files: dict[str, tuple[Path, int]] = {}  # family -> (path, fd)
        self._pid = os.getpid()
        for family in (EVENTS, CONTROL):
            (self.directory / family).mkdir(parents=True, exist_ok=True)
        repair(self.directory)

    def append(self, rows: Sequence[Mapping[str, object]]) -> None:
        """Write the rows (one JSON line each) and fsync; returns only once they are durable."""
        batches: dict[str, list[bytes]] = {}
        for row in rows:
            family = CONTROL if row.get("event_type") in CONTROL_TYPES else EVENTS
            if family == CONTROL:
                _check_control(row)
            try:
                line = orjson.dumps(dict(row), option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_UTC_Z)
            except TypeError as exc:  # orjson.JSONEncodeError: nothing is written
                raise EventLogError(f"row cannot be written as JSON: {exc}") from exc
            batches.setdefault(family, []).append(line)
        if not batches:
            return
        with self._lock:
            self._after_fork()
            hour = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y%m%d%H")
            started: list[tuple[Path, int, int]] = []
            try:
                for family, lines in batches.items():
                    path, fd = self._file(family, hour)
                    started.append((path, fd, os.fstat(fd).st_size))
                    _write_all(fd, b"".join(lines))
                for _, fd, _ in started:
                    os.fsync(fd)
            except (OSError, EventLogError) as exc:
                for path, fd, size in started:
                    self._cut_back(path, fd, size)
                raise EventLogError(f"event log write failed, batch not acknowledged: {exc}") from exc

    def paths(self) -> list[Path]:
        """The files this log has open now."""
        with self._lock:
            return [path for path, _ in self._files.values()]

    def release_idle(self) -> int:
        """Close the files of past hours that no append has moved on from yet (a family with nothing new since
        the hour turned), so compaction can rewrite them; returns how many were closed."""
        with self._lock:
            self._after_fork()
            hour = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y%m%d%H")
            idle = [family for family, (path, _) in self._files.items() if hour_of_file(path) != hour]
            for family in idle:
                os.close(self._files.pop(family)[1])
            return len(idle)

    def close(self) -> None:
        with self._lock:
            for _, fd in self._files.values():
                os.close(fd)
            self._files.clear()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:  # the parent's files and locks are not ours to write
            for _, fd in self._files.values():
                os.close(fd)
            self._files.clear()
            self._pid = os.getpid()

    def _file(self, family: str, hour: str) -> tuple[Path, int]:
        path = self.directory / family / f"{family}-{self._host}-{self._pid}-{hour}{SUFFIX}"
        current = self._files.get(family)
        if current is not None and current[0] == path:
            return current
        if current is not None:
            os.close(current[1])
            del self._files[family]
        for _ in range(3):
            existed = path.exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    os.close(fd)  # compaction renamed a new file over this name between our open and lock
                    continue
                if existed:
                    _cut_torn_tail(fd)
                else:
                    fsync_dir(path.parent)  # the new name must survive a crash as well as its content
            except OSError as exc:
                os.close(fd)
                raise EventLogError(f"cannot open {path} for writing: {exc}") from exc
            self._files[family] = (path, fd)
            return path, fd
        raise EventLogError(f"cannot open {path} for writing: it keeps being replaced")

    def _cut_back(self, path: Path, fd: int, size: int) -> None:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError:
            # The file may now end in part of the failed batch; stop using it (a restart cuts a torn line).
            # Stop using the file: opening it again cuts a torn last line before the next batch.
            log.exception("event log: could not cut %s back to %d bytes", path, size)
            for family, (_, open_fd) in list(self._files.items()):
                if open_fd == fd:
                    del self._files[family]
                    os.close(open_fd)


# -- reading ----------------------------------------------------------------------------------------------------
def _rows(path: Path) -> Iterator[dict[str, object]]:
    """Complete lines of one log file as objects (a last line still being written is left out)."""
    data = path.read_bytes()
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("event log: skipped a line that is not JSON in %s", path)
            continue
        if isinstance(value, dict):
            yield value


def read_control(directory: Path) -> list[dict[str, object]]:
    """Every consent and erasure row of the log, oldest first (rows without a readable time last)."""
    rows = [row for path in log_files(Path(directory), (CONTROL,)) for row in _rows(path)]
    return sorted(rows, key=lambda r: _sort_time(r.get("timestamp")))


def erased_users(directory: Path) -> set[str]:
    """Users the log says were erased (whose events training must leave out)."""
    return {str(r["user_id"]) for r in read_control(directory) if r.get("event_type") == ERASE}


def _sort_time(value: object) -> float:
    ts = epoch_seconds(value)
    return float("inf") if ts is None else ts


@dataclass(frozen=True, slots=True)
class ReplayStats:
    events: int  # events recorded into the store
    control: int  # consent and erasure rows applied
    skipped: int  # rows left out: unreadable, incomplete, or an event_id seen before


def replay(directory: Path, store: OnlineStore, since: float | None = None, *,
           category_of: Callable[[str], str | None] | None = None) -> ReplayStats:
    """Rebuild the online store from the log: events at or after `since` and every control row, in time order.

    An erasure drops what the user's earlier events built and makes the store ignore their later ones;
    trending counters keep the earlier counts, as they did live. Meant for an empty store, or for one that
    lost what came after `since`: counters add up, so replaying the same events twice counts them twice.
    Event ids of the last EVENT_ID_TTL_SECONDS are claimed again so client retries stay no-ops.
    """
    directory = Path(directory)
    events, skipped = read_events(directory, since, category_of)
    if events:
        newest = events[-1][1].ts
        recent_ids = [key for key, event in events if key is not None and event.ts >= newest - EVENT_ID_TTL_SECONDS]
        for start in range(0, len(recent_ids), _REPLAY_BATCH):
            store.claim_event_ids(recent_ids[start : start + _REPLAY_BATCH])
    pending: list[OnlineEvent] = []
    at = 0
    applied = 0
    for row in [*read_control(directory), {}]:  # a sentinel after the last row flushes the rest
        until = _sort_time(row.get("timestamp")) if row else float("inf")
        while at < len(events) and events[at][1].ts <= until:
            pending.append(events[at][1])
            at += 1
            if len(pending) == _REPLAY_BATCH:
                store.record(pending)
                pending = []
        if pending:
            store.record(pending)
            pending = []
        applied += apply_control(store, row)
    return ReplayStats(events=len(events), control=applied, skipped=skipped)


def apply_control(store: OnlineStore, row: Mapping[str, object]) -> int:
    """Apply one consent or erasure row to the store; 1 when it was one, else 0."""
    user_id = row.get("user_id")
    if not isinstance(user_id, str):
        return 0
    if row.get("event_type") == ERASE:
        store.erase_user(user_id)
        return 1
    purposes = row.get("purposes")
    if row.get("event_type") == CONSENT and isinstance(purposes, dict):
        store.set_consent(user_id, {str(p): bool(v) for p, v in purposes.items() if p in CONSENT_PURPOSES})
        return 1
    return 0


def read_events(directory: Path, since: float | None,
                category_of: Callable[[str], str | None] | None) -> tuple[list[tuple[str | None, OnlineEvent]], int]:
    """The log's events at or after `since`, oldest first, each with its event id (the first row of an id
    only); and the rows left out."""
    skipped = 0
    seen: set[str] = set()
    events: list[tuple[str | None, OnlineEvent]] = []
    for path in log_files(directory, (EVENTS,)):
        for row in _rows(path):
            ts = epoch_seconds(row.get("timestamp"))
            user_id, item_id, kind = row.get("user_id"), row.get("item_id"), row.get("event_type")
            if ts is None or not (isinstance(user_id, str) and isinstance(item_id, str) and isinstance(kind, str)):
                skipped += 1
                continue
            event_id = row.get("event_id")
            key = None if event_id is None else str(event_id)
            if key is not None and key in seen:
                skipped += 1
                continue
            if key is not None:
                seen.add(key)
            if since is not None and ts < since:
                continue
            category = row.get("category")
            if not isinstance(category, str):
                category = category_of(item_id) if category_of is not None else None
            target, referrer = row.get("target_user_id"), row.get("referrer_id")
            events.append((key, OnlineEvent(user_id, item_id, kind.strip().lower(), ts, category,
                                            target if isinstance(target, str) and target else None,
                                            referrer if isinstance(referrer, str) and referrer else None)))
    events.sort(key=lambda pair: pair[1].ts)
    return events, skipped
