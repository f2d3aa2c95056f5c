"""Automatic recovery: drain the spool into the database while live writes go on.

Design: the drain runs *on the writer thread*, one batch at a time, and only
when no live batch is due (`Writer.background`). So live data has priority by
construction, the drain shares the writer's one sink and connection (no
second connection, no SQLite connection crossing threads mid-transaction), and
it stops by itself in outage mode and when the pipeline stops. A live batch
waits at most for one backlog batch to commit.

Pacing: `backup.replay_rate` values/s when set; otherwise adaptive, the drain
spends at most half of the writer's time (after a backlog batch that took t
seconds it waits t), which leaves the database room for the live stream and
other clients. The writer parks only until the next step is due (it asks
`due_in` after each step), so the achieved rate is the configured one, not
rounded down to its idle tick.

Crash safety comes from `tagwriter.replay`: a file is moved to
`replayed/` only once every line of it is settled; a file interrupted midway
stays and is replayed from its start next time, its first rows then counting
as duplicates. Replayed rows are counted apart from the live counters
(`snapshot.extra`: replayed, replay_duplicates, replay_quarantined, ...), so
submitted = written + duplicates + spooled + quarantined + dropped + pending
still holds for this run's values.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tagwriter.backoff import Backoff
from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.config import Config
from tagwriter.errors import InputError, SinkError, SpoolError
from tagwriter.models import TagValue
from tagwriter.replay import REPLAYED_DIR, FileReplay
from tagwriter.sinks.base import Sink
from tagwriter.spool import Spool
from tagwriter.spooltarget import TARGET_FILE, read_target, record_target, sink_target

log = logging.getLogger(__name__)

RESCAN_INTERVAL = 10.0  # seconds between looks at the spool folder while idle
RATE_WINDOW = 10.0  # seconds the drain rate is averaged over
MIN_RATE_SPAN = 1.0  # a drain that just started is averaged over at least this long
ADAPTIVE_DUTY = 0.5  # share of the writer's time the adaptive drain may use
SAMPLE_BYTES = 64 * 1024  # read to estimate bytes per row before any file is drained
DEFAULT_ROW_BYTES = 53.0  # typical spool line (tag of ~15 chars), until measured


class SpoolDrain:
    """Replays completed spool files, oldest first, a batch per `step()`.

    `due_in` and `step` are the writer thread's (see `Writer.background`);
    `trigger`, `status` and `close` may be called from any thread. The file
    being written (`.partial`) is never touched: only completed `.csv` files.
    """

    def __init__(self, spool: Spool, sink: Sink, config: Config, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.spool = spool
        self.sink = sink
        self.clock = clock
        self.batch_size = config.writer.batch_size
        # The live writer's retry delays, then the probe's capped doubling.
        self.backoff = Backoff(config.writer.retry_delays or [config.writer.probe_interval],
                               cap=config.writer.probe_max_interval)
        self.rate = config.backup.replay_rate
        self.replayed_dir = spool.directory / REPLAYED_DIR
        self._lock = threading.Lock()
        self._triggered = True  # files an earlier run left are drained at start
        self._queue: deque[Path] = deque()
        self._current: FileReplay | None = None
        self._pending: list[TagValue] = []  # a batch whose write failed, retried as is
        self._next_at = 0.0
        self._next_scan = 0.0
        self._delays: Iterator[float] | None = None  # the back-off after a failed write; None: none
        self._skip: set[Path] = set()  # refused or unmovable files: left alone until restart
        self._target_checked = False
        self._window: deque[tuple[float, int]] = deque()
        self._rate_since = 0.0  # when the rows now in the window started draining
        self._row_bytes = 0.0  # measured on drained lines; 0 = not yet
        self._sampled_row_bytes = 0.0  # sampled from a spool file before any is drained; 0 = not yet
        self.replayed = 0
        self.duplicates = 0
        self.quarantined = 0
        self.bad_lines = 0
        self.files_done = 0

    # -- any thread --------------------------------------------------------

    def trigger(self) -> None:
        """Look at the folder again; a drain backing off after failed writes resumes at once (the database is back)."""
        with self._lock:
            self._triggered = True

    def close(self) -> None:
        """Let go of the file being replayed; it stays for the next run."""
        with self._lock:
            current, self._current = self._current, None
            self._pending = []
        if current is not None:
            current.close()

    def status(self) -> dict[str, Any]:
        """Backlog and drain figures for `Metrics.snapshot(**status)`; backlog rows are estimated.

        From the spool's counts: no folder scan, whatever the backlog.
        """
        count, size = self.spool.backup.completed(excluding=self._skip.copy())  # a copy: the writer adds to it
        now = self.clock.monotonic()
        with self._lock:
            current = self._current
            done_chars = current.reader.chars if current is not None else 0
            while self._window and self._window[0][0] < now - RATE_WINDOW:
                self._window.popleft()
            drained = sum(n for _, n in self._window)
            # A drain that started less than RATE_WINDOW ago is averaged over its own time.
            span = min(RATE_WINDOW, max(now - self._rate_since, MIN_RATE_SPAN))
            extra = {
                "replayed": self.replayed,
                "replay_duplicates": self.duplicates,
                "replay_quarantined": self.quarantined,
                "replay_bad_lines": self.bad_lines,
                "replayed_files": self.files_done,
            }
        rows = round(max(0, size - done_chars) / self._bytes_per_row()) if count else 0
        rate = drained / span if drained else 0.0
        return {
            "backlog_rows": rows,
            "backlog_files": count,
            "drain_rate_per_s": rate,
            "drain_eta_s": rows / rate if rows and rate > 0 else None,
            **extra,
        }

    def _bytes_per_row(self) -> float:
        """Measured on drained files; until then sampled once from the oldest spool file."""
        if self._row_bytes:
            return self._row_bytes
        if not self._sampled_row_bytes:
            files = self.spool.backup.files()  # once: a listing, not a look at every file
            try:
                with open(files[0], "rb") as f:
                    sample = f.read(SAMPLE_BYTES)
            except (OSError, IndexError):
                return DEFAULT_ROW_BYTES
            lines = sample.count(b"\n")
            self._sampled_row_bytes = len(sample) / lines if lines > 1 else DEFAULT_ROW_BYTES
        return self._sampled_row_bytes

    # -- the writer thread -------------------------------------------------

    def due_in(self) -> float | None:
        """Seconds until the next step is due (0 = now), or None with nothing to drain."""
        now = self.clock.monotonic()
        with self._lock:
            triggered, self._triggered = self._triggered, False
            busy = self._current is not None or bool(self._queue)
        if triggered and self._delays is not None:
            # Backing off after failed writes: the database is back, try now. A paced drain keeps its pace:
            # the writer may have taken a step between the end of the outage and this trigger.
            self._next_at = now
            self._delays = None
        if triggered or (not busy and now >= self._next_scan):
            self._scan(now)
            busy = self._current is not None or bool(self._queue)
        if not busy:
            return None
        return max(0.0, self._next_at - now)

    def step(self) -> None:
        """Replay one batch (or open or finish a file). Bounded: at most one write."""
        started = self.clock.monotonic()
        fr = self._current or self._open_next()
        if fr is None:
            return
        try:
            rows = self._pending or fr.next_batch(self.batch_size)
            if rows:
                try:
                    result = self.sink.write_batch(rows)
                except SinkError as exc:
                    self._pending = rows
                    self._back_off(started, exc, fr)
                    return
                self._pending = []
                self._delays = None
                fr.settle(rows, result)
                self._count(started, len(rows), result.written, result.duplicates, len(result.rejected))
                self._pace(started, len(rows))
            if fr.done and not self._pending:
                self._finish(fr)
        except (SpoolError, OSError) as exc:
            log.error("auto replay of %s stopped: %s; the file stays, replay it with "
                      "`tagwriter replay` once the cause is fixed", fr.path, exc)
            self._drop(fr, skip=True)

    def _scan(self, now: float) -> None:
        self._next_scan = now + RESCAN_INTERVAL
        self.check_target()
        current = self._current.path if self._current is not None else None
        files = [p for p in self.spool.backup.files() if p != current and p not in self._skip]
        with self._lock:
            self._queue = deque(files)
        if files:
            log.info("auto replay: %d spool file%s to drain", len(files), "s" * (len(files) != 1))

    def check_target(self) -> None:
        """Once, before the first drain: leave alone spool files an earlier run made for another database.

        The spool folder's TARGET_FILE (`tagwriter.spooltarget`) names the database (no
        password) its files were spooled for. Files found at start while it
        names another one are not drained here (a scratch run must not pour a
        production backlog into its own database); `tagwriter replay` moves
        them on purpose. Otherwise the file is (re)written with this run's target.
        """
        if self._target_checked:
            return
        self._target_checked = True
        target = sink_target(self.sink)
        previous = read_target(self.spool.directory)
        files = self.spool.backup.files()
        if files and previous and previous != target:
            self._skip.update(files)
            log.warning(
                "auto replay: %d spool file%s in %s were spooled for %s, not for %s: left alone; "
                "replay them into their database with `tagwriter replay %s`",
                len(files), "s" * (len(files) != 1), self.spool.directory, previous, target, self.spool.directory,
            )
            return
        try:
            record_target(self.spool.directory, target)
        except OSError as exc:
            log.warning("auto replay: cannot record the spool's target in %s: %s",
                        self.spool.directory / TARGET_FILE, exc)

    def _open_next(self) -> FileReplay | None:
        with self._lock:
            path = self._queue.popleft() if self._queue else None
        if path is None:
            return None
        try:
            fr = FileReplay(path, self.spool, replayed_dir=self.replayed_dir, source="auto replay")
        except InputError as exc:
            if exc.reason != "no such file":  # replayed by `tagwriter replay` meanwhile
                log.error("auto replay: %s; left in place", exc)
                self._skip.add(path)
            return None
        with self._lock:
            self._current = fr
        return fr

    def _back_off(self, started: float, exc: SinkError, fr: FileReplay) -> None:
        if self._delays is None:
            self._delays = iter(self.backoff)
        delay = next(self._delays)
        self._next_at = started + delay
        log.warning("auto replay of %s: batch failed (%s); retry in %gs (the file stays until done)",
                    fr.path.name, exc, delay)

    def _pace(self, started: float, rows: int) -> None:
        now = self.clock.monotonic()
        if self.rate > 0:
            self._next_at = started + rows / self.rate
        else:
            self._next_at = now + (now - started) * (1.0 / ADAPTIVE_DUTY - 1.0)

    def _count(self, started: float, rows: int, written: int, duplicates: int, rejected: int) -> None:
        with self._lock:
            self.replayed += written
            self.duplicates += duplicates
            self.quarantined += rejected
            now = self.clock.monotonic()
            while self._window and self._window[0][0] < now - RATE_WINDOW:
                self._window.popleft()
            if not self._window:
                self._rate_since = started
            self._window.append((now, rows))

    def _finish(self, fr: FileReplay) -> None:
        lines = fr.lines_processed()
        if lines:
            self._row_bytes = fr.reader.chars / (lines + 1)
        report = fr.finish()
        with self._lock:
            self._current = None
            self.bad_lines += report.bad_lines
            self.files_done += 1
        log.info(
            "auto replay: %s done: %d rows read, %d inserted, %d duplicates, %d quarantined, "
            "%d bad lines -> %s", fr.path.name, report.rows_read, report.inserted, report.duplicates,
            report.quarantined, report.bad_lines, report.moved_to,
        )

    def _drop(self, fr: FileReplay, *, skip: bool) -> None:
        fr.close("stopped")
        with self._lock:
            self._current = None
            self._pending = []
        if skip:
            self._skip.add(fr.path)

