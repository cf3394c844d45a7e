"""Compaction of the event log: rewrite the event files holding erased users' events without them.

Only a file no writer holds is touched: a writer keeps `flock LOCK_EX` on its open file, compaction takes
`LOCK_EX | LOCK_NB` and leaves a busy file for a later run. A file is written anew beside the old one,
fsync'ed, renamed over it and the directory fsync'ed, so a crash leaves either the old file or the new one
(a writer that opened the old one meanwhile notices the swap, see `EventLog`). The rows of other users stay
byte for byte; another user's row naming an erased user as a share's recipient (`target_user_id`) or as
the referrer (`referrer_id`) keeps its place without that id. A last line without its newline (a write cut
short) goes too: it was never acknowledged. Control files, the tombstones, are never rewritten.

`DIR/.compaction/` holds the lock (one compaction at a time, whichever process) and what each file was
already checked against, so a run reads only new files and, for the others, looks for newly erased users.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from features.eventlog import EVENTS, fsync_dir, hour_of_file, log_files
from features.ledger import ControlLedger

log = logging.getLogger(__name__)

STATE_DIR = ".compaction"
_NAMED = ("target_user_id", "referrer_id")  # columns of other users' rows that may name an erased user
_SUBSTRING_CHECK_MAX = 256  # look for at most this many ids by substring; more: parse every line
_JSON = orjson.OPT_APPEND_NEWLINE | orjson.OPT_UTC_Z  # how EventLog writes a row


@dataclass(frozen=True, slots=True)
class CompactionReport:
    files_checked: int = 0  # event files read (new, changed, or checked for newly erased users)
    files_rewritten: int = 0
    rows_removed: int = 0  # erased users' own events
    rows_redacted: int = 0  # other users' events that named an erased user (that id removed)
    files_busy: int = 0  # held by a writer: left for a later run
    files_overdue: int = 0  # busy, and holding a row past its deadline (erasure + retention)
    skipped: bool = False  # another compaction held the lock


@dataclass(slots=True)
class _Seen:
    inode: int
    size: int
    mtime_ns: int
    checked: int  # how many ids of the state's erased list this content was checked against

    def same(self, stat: os.stat_result) -> bool:
        return (self.inode, self.size, self.mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def compact(directory: Path, erasures: Mapping[str, float], *, now: float,
            retention_seconds: float = float("inf")) -> CompactionReport:
    """Remove the events of every user in `erasures` (user -> time of erasure) from the log's closed event
    files; count busy files still holding rows past `retention_seconds` (after the erasure, or after the end
    of the file's hour for rows written later)."""
    directory = Path(directory)
    state_dir = directory / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(state_dir / "lock") as held:
        if not held:
            return CompactionReport(skipped=True)
        for stale in (directory / EVENTS).glob(".*.compact.tmp"):  # a crash mid-way left it
            stale.unlink(missing_ok=True)
        order, seen = _load_state(state_dir / "state.json")
        known = set(order)
        order += sorted((u for u in erasures if u not in known), key=lambda u: (erasures[u], u))
        report = _Counts()
        files = log_files(directory, (EVENTS,))
        kept: dict[str, _Seen] = {}
        for path in files:
            record = _compact_file(path, seen.get(path.name), order, erasures, now, retention_seconds, report)
            if record is not None:
                kept[path.name] = record
        _save_state(state_dir / "state.json", order, kept)
    return report.freeze()


def compact_log(directory: Path, *, now: float, retention_seconds: float = float("inf")) -> CompactionReport:
    """`compact` with every erasure the log's control files hold (what `sharefeed compact` runs)."""
    return compact(directory, ControlLedger(directory).erasures(), now=now, retention_seconds=retention_seconds)


@dataclass(slots=True)
class _Counts:
    checked: int = 0
    rewritten: int = 0
    removed: int = 0
    redacted: int = 0
    busy: int = 0
    overdue: int = 0

    def freeze(self) -> CompactionReport:
        return CompactionReport(self.checked, self.rewritten, self.removed, self.redacted, self.busy, self.overdue)


def _compact_file(path: Path, before: _Seen | None, order: list[str], erasures: Mapping[str, float], now: float,
                  retention_seconds: float, counts: _Counts) -> _Seen | None:
    """Compact one file; what it was checked against afterwards (None: not checked, look again next time)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        stat = os.fstat(fd)
        start = before.checked if before is not None and before.same(stat) else 0
        if start == len(order):
            return before  # nothing new in it, nobody newly erased
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            counts.busy += 1
            if _overdue(path, fd, erasures, now, retention_seconds):
                counts.overdue += 1
            return before
        if os.stat(path).st_ino != stat.st_ino:
            return None  # replaced since we opened it: the next run reads the new one
        counts.checked += 1
        data = _read_all(fd)
        look_for = order[start:]
        if not _may_hold(data, look_for):
            return _Seen(stat.st_ino, stat.st_size, stat.st_mtime_ns, len(order))
        compacted, removed, redacted = _without(data, set(order))
        if not removed and not redacted:
            return _Seen(stat.st_ino, stat.st_size, stat.st_mtime_ns, len(order))
        new = _replace(path, compacted, stat.st_mode & 0o777)
        counts.rewritten += 1
        counts.removed += removed
        counts.redacted += redacted
        return _Seen(new.st_ino, new.st_size, new.st_mtime_ns, len(order))
    finally:
        os.close(fd)  # releases the lock (on the old file, when it was replaced)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    parts, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 24), offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _may_hold(data: bytes, user_ids: list[str]) -> bool:
    """Whether any of these ids may occur in the file (a JSON string of it occurs; False is certain)."""
    if len(user_ids) > _SUBSTRING_CHECK_MAX:
        return True
    return any(orjson.dumps(user_id) in data for user_id in user_ids)


def _lines(data: bytes) -> Iterator[bytes]:
    """The complete lines, each with its newline."""
    end = data.rfind(b"\n") + 1
    for line in data[:end].split(b"\n")[:-1]:
        yield line + b"\n"


def _without(data: bytes, erased: set[str]) -> tuple[bytes, int, int]:
    """The file's bytes without erased users' rows and with their ids taken out of other rows."""
    out: list[bytes] = []
    removed = redacted = 0
    for line in _lines(data):
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            out.append(line)  # not ours to judge; every reader skips it
            continue
        if not isinstance(row, dict):
            out.append(line)
            continue
        user_id = row.get("user_id")
        if isinstance(user_id, str) and user_id in erased:
            removed += 1
            continue
        named = [c for c in _NAMED if isinstance(row.get(c), str) and row[c] in erased]
        if named:
            for column in named:
                del row[column]
            out.append(orjson.dumps(row, option=_JSON))
            redacted += 1
            continue
        out.append(line)
    return b"".join(out), removed, redacted


def _overdue(path: Path, fd: int, erasures: Mapping[str, float], now: float, retention_seconds: float) -> bool:
    """Whether a busy file holds an erased user's row past its deadline: retention after the erasure, or
    after the end of the file's hour for a row written after the erasure."""
    if retention_seconds == float("inf"):
        return False
    try:
        hour_end = datetime.strptime(hour_of_file(path), "%Y%m%d%H").replace(tzinfo=UTC).timestamp() + 3600
    except ValueError:
        hour_end = now
    due = [u for u, erased_at in erasures.items() if max(erased_at, hour_end) + retention_seconds < now]
    if not due:
        return False
    data = _read_all(fd)
    if not _may_hold(data, due):
        return False
    _, removed, redacted = _without(data, set(due))
    return bool(removed or redacted)


def _replace(path: Path, data: bytes, mode: int) -> os.stat_result:
    """Write `data` to a new file and rename it over `path`, both durable before returning."""
    tmp = path.with_name(f".{path.name}.compact.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        stat = os.fstat(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return stat


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _load_state(path: Path) -> tuple[list[str], dict[str, _Seen]]:
    try:
        raw = orjson.loads(path.read_bytes())
        order = [str(u) for u in raw["erased"]]
        seen = {str(name): _Seen(*(int(v) for v in values)) for name, values in raw["files"].items()}
    except (FileNotFoundError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return [], {}  # none yet, or unreadable: check everything again
    return order, seen


def _save_state(path: Path, order: list[str], seen: Mapping[str, _Seen]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(orjson.dumps({"erased": order, "files": {
        name: [s.inode, s.size, s.mtime_ns, s.checked] for name, s in seen.items()}}))
    os.replace(tmp, path)
