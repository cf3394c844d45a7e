"""The service's background upkeep of the event log: compaction (features.compaction), so an erased user's
events leave the log within `ERASURE_RETENTION_HOURS`, and the control ledger's full re-reads.

Every worker runs one small thread. Each minute it closes its own log files of past hours (a file is
compacted only once no writer holds it) and re-reads every control file (requests refresh the ledger
quickly, from the files of the last hours); every `COMPACTION_INTERVAL_SECONDS` it tries to compact, and
the lock file lets one worker at a time do it. Only counts are logged, never an id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from features.compaction import CompactionReport, compact
from features.eventlog import EventLog
from features.ledger import ControlLedger

log = logging.getLogger(__name__)

TICK_SECONDS = 60.0


class Compactor:
    def __init__(self, event_log: EventLog, ledger: ControlLedger, *, retention_seconds: float,
                 interval_seconds: float, tick_seconds: float = TICK_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.event_log = event_log
        self.ledger = ledger
        self.retention_seconds = retention_seconds
        self.interval_seconds = interval_seconds
        self.tick_seconds = min(tick_seconds, interval_seconds) if interval_seconds > 0 else tick_seconds
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> CompactionReport:
        """Close idle files of past hours, re-read the control files, then compact with every erasure."""
        self._upkeep()
        report = compact(self.event_log.directory, self.ledger.erasures(), now=self._clock(),
                         retention_seconds=self.retention_seconds)
        if report.skipped:
            log.debug("event log compaction: another process is at it")
            return report
        log.info("event log compaction: %d files checked, %d rewritten, %d events of erased users removed, "
                 "%d events redacted, %d files in use left for later", report.files_checked, report.files_rewritten,
                 report.rows_removed, report.rows_redacted, report.files_busy)
        if report.files_overdue:
            log.warning("event log compaction: %d files in use still hold erased users' events past the retention "
                        "period", report.files_overdue)
        return report

    def _upkeep(self) -> None:
        self.event_log.release_idle()
        self.ledger.refresh(full=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="eventlog-upkeep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        last = -float("inf")
        while not self._stop.wait(self.tick_seconds):
            try:
                # interval 0: compaction runs from cron (`sharefeed compact`); the upkeep still does
                if self.interval_seconds > 0 and time.monotonic() - last >= self.interval_seconds:
                    last = time.monotonic()
                    self.run_once()
                else:
                    self._upkeep()
            except Exception:  # a full disk or a bad file must not end the upkeep for the life of the worker
                log.exception("event log upkeep failed")
