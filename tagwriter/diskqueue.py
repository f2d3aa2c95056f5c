"""`DiskQueue`: the durable buffer (`buffer.durability = "disk"`). Values are on disk before the writer takes them.

    submit ─▶ pending (memory) ──group commit, fsync──▶ queue.db (SQLite, WAL) ──▶ read-ahead ring ──▶ writer
                                     │ receipts settle here                      released after the database
                                     ▼                                            commits (or the spool takes them)

- **Engine**: SQLite from the standard library, WAL journal, `synchronous=FULL`:
  each group commit is one transaction whose COMMIT fsyncs the WAL. A
  transaction is atomic, so a record and its release, or a record and a
  source's resume position (`cursor`), are never half written.
- **Group commit**: a commit thread writes what was submitted every
  `fsync_interval` seconds (0 = at once, one commit per wake-up: "always"),
  then settles the receipts (`settlement`). Only then does the writer see
  the values: the in-memory ring (`capacity` values) is a read-ahead cache of
  the queue; what does not fit stays on disk and is read back in order.
- **Release**: the writer releases a batch once the database committed it (or
  it was spooled, quarantined, counted as dropped); releases go into the next
  group commit (`DELETE` of the records wholly released and the new
  watermark, in one transaction). Records released ahead of the watermark
  (dropped while the writer holds an older batch) are deleted too, so the
  cap holds; a later start passes over their positions. Released space is
  reused by SQLite; an emptied queue gives it back (incremental vacuum).
- **Start**: what was queued and not released is *recovered*: read back and
  written first. A record whose CRC fails is moved to `corrupt/` (its bytes
  and its position) and counted; a database SQLite cannot open is moved to
  `corrupt/` whole (so is a file shorter than a database header, or whose
  index does not add up) and a new queue is started; a torn WAL tail (a
  commit cut short: never acknowledged) is logged with its byte offset and
  counted.
- **Capacity**: `max_bytes` of records on disk (0 = no cap). At the cap, and
  while the disk is full (ENOSPC: the commit fails and is tried again every
  interval, nothing pending is lost), the overflow policy decides: `spill`
  hands the new values back for the CSV spool, `drop-oldest` drops the oldest
  values not yet taken by the writer, `block` waits for room.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tagwriter.buffer import Batch, OverflowPolicy, PutResult, RingBuffer
from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.models import Chunk, TagValue
from tagwriter.queueformat import ChunkError, chunk_crc, decode_chunk, encode_chunk, sync_directory, torn_wal_tail
from tagwriter.settle import Settlement

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.db"
CORRUPT_DIR = "corrupt"
DB_TIMEOUT = 5.0  # seconds a statement waits for a lock (only this process uses the file)
ROW_ESTIMATE = 40  # bytes a pending value is reckoned at before it is encoded
READ_CHUNKS = 64  # records read back from disk at a time
ERROR_LOG_INTERVAL = 10.0  # seconds between "cannot commit" log lines
FSYNC_SAMPLES = 1024  # commit latencies kept for the percentiles
IDLE_PERSIST = 0.5  # seconds an idle commit thread waits before it persists releases
IDLE_RETRY = 0.05  # seconds between tries of a commit that failed
COMMIT_GRACE = 1.0  # seconds `shutdown` gives its last group commit, past a spent deadline (ms on a sound disk)
WAL_LIMIT = 16 * 1024**2  # bytes a WAL is cut back to after a checkpoint
VACUUM_PAGES = 256  # free pages that make an emptied queue give its space back
SQLITE_HEADER = 100  # bytes: a database file is never shorter
RECORD_VALUES = 5_000  # values one record holds at most when a group commit joins submits
UNBOUNDED = 2**62  # the ring's own capacity: the read-ahead limit is the queue's to keep

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS chunks (seq INTEGER PRIMARY KEY, n INTEGER NOT NULL, "
    "t_wall REAL NOT NULL, crc INTEGER NOT NULL, data BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS cursors (key TEXT PRIMARY KEY, position TEXT NOT NULL) WITHOUT ROWID",
)


class QueueError(Exception):
    """The queue folder cannot be used at all (not creatable, not writable); `disk_full` when that is why."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


class _BadRecord(Exception):
    """A record that cannot be trusted; its bytes, if any."""

    def __init__(self, why: str, data: bytes | None) -> None:
        super().__init__(why)
        self.data = data


@dataclass(slots=True)
class _Pending:
    """Rows submitted and not yet committed."""

    seq: int
    rows: Sequence[TagValue]
    t_submit: float  # clock.monotonic() at submit
    t_wall: float
    cursor: tuple[str, str] | None


@dataclass(slots=True, eq=False)
class _Chunk:
    """What is known in memory of a committed, unreleased record."""

    seq: int
    n: int
    size: int
    done: int = 0  # of its values released (in any order)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The queue's figures for metrics, the panel and `status`."""

    values: int  # durable and not released
    bytes: int  # of those records
    pending: int  # submitted, not yet durable
    oldest_age: float  # seconds since the oldest unreleased value was submitted (0 when empty)
    acknowledged: int  # values made durable since start
    released: int  # values released since start
    recovered: int  # values found queued at start
    corrupt: int  # values in records moved aside (CRC) since start
    torn_tails: int  # torn WAL tails cut at start
    commits: int
    fsync_p50: float | None  # seconds a group commit took, over the last FSYNC_SAMPLES
    fsync_p99: float | None
    disk_full: bool
    max_bytes: int


class DiskQueue:
    """The durable queue. Thread-safe; presents the writer the same calls as `RingBuffer`."""

    def __init__(
        self,
        directory: Path | str,
        *,
        capacity: int = 100_000,
        policy: OverflowPolicy | str = OverflowPolicy.SPILL,
        max_bytes: int = 0,
        fsync_interval: float = 0.05,
        block_timeout: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.directory = Path(directory)
        self.policy = OverflowPolicy(policy)
        self.max_bytes = max_bytes
        self.fsync_interval = fsync_interval
        self.block_timeout = block_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._commit_wake = threading.Condition(self._lock)  # the commit thread waits here
        self._room = threading.Condition(self._lock)  # puts blocked at the cap wait here
        self._interval = threading.Condition(self._lock)  # the pause between group commits; cut short by close
        self._pending: list[_Pending] = []
        self._pending_values = 0
        self._chunks: deque[_Chunk] = deque()  # committed, not wholly released, in order
        self._done: list[_Chunk] = []  # wholly released since the last commit: deleted by it
        self._stored_bytes = 0
        self._disk_from: int | None = None  # first committed seq not in the ring (None: all are)
        self._committed_end = 0  # seq after the last committed value
        self._cursors: dict[str, str] = {}
        self._closed = False
        self._stopped = False
        self.disk_full = False
        self.waiting = 0
        self.overflowed = 0
        self.blocked_puts = 0
        self.recovered = 0
        self.corrupt = 0
        self.torn_tails = 0
        self.acknowledged = 0
        self.released_total = 0
        self.commits = 0
        self._fsync_times: deque[float] = deque(maxlen=FSYNC_SAMPLES)
        self._oldest_wall: deque[tuple[int, float]] = deque()  # (seq end, t_wall) per unreleased chunk
        self._error_logged = float("-inf")
        self._read_error_logged = float("-inf")
        #: Called with the number of values in a record that cannot be trusted (the pipeline counts them dropped).
        self.on_corrupt: Callable[[int], None] | None = None
        #: Called before a release is made durable: what was spooled must be on disk before the queue forgets it.
        self.before_release: Callable[[], None] | None = None
        self._db, first = self._open()
        self._next_seq = self._committed_end
        self._released = Settlement(first)  # what the writer has settled; moves the release watermark
        self._persisted_release = first
        #: Durable positions: what a `Receipt` waits on.
        self.settlement = Settlement(self._committed_end)
        self._readahead = capacity
        self._ring = RingBuffer(UNBOUNDED, OverflowPolicy.DROP_OLDEST, clock=clock, start=first)
        self._disk_from = first if self._chunks else None
        self._reader = self._connect()
        self._thread = threading.Thread(target=self._run, name="tagwriter-queue", daemon=True)

    # -- opening -----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """A connection in autocommit mode (transactions are explicit). Each is used by one thread at a time:
        the main one by the commit thread (and by `shutdown` once it ended), the reader by the writer thread."""
        db = sqlite3.connect(self.directory / QUEUE_FILE, timeout=DB_TIMEOUT, isolation_level=None,
                             check_same_thread=False)
        try:
            if db.execute("PRAGMA page_count").fetchone()[0] == 0:  # (on a file with tables it is a write, for nothing)
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # a new file: released pages can be given back
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        except BaseException:
            db.close()  # closed now, not whenever the traceback goes: the files may be moved aside next
            raise
        return db

    def _open(self) -> tuple[sqlite3.Connection, int]:
        """Open (or make) the queue; recover what it holds. Returns the connection and the first unreleased seq."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QueueError(f"cannot make the queue folder {self.directory}: {exc.strerror}") from None
        path = self.directory / QUEUE_FILE
        created = not path.exists()
        moved = None
        if not created and (size := path.stat().st_size) < SQLITE_HEADER:  # SQLite takes 1 byte as a new file
            moved = self._move_aside(f"is {size} bytes, shorter than a database header")
        torn = torn_wal_tail(path.with_name(QUEUE_FILE + "-wal"))
        if torn is not None:
            self.torn_tails += 1
            log.error("queue %s-wal: a torn tail of %d bytes at byte offset %d (%d whole frames of a group "
                      "commit cut short) is cut; its values were never acknowledged", path, torn.size,
                      torn.offset, torn.frames)
        try:
            db, first = self._open_db()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and not _is_corrupt(exc):
                full = " (the disk is full)" if _is_disk_full(exc) else ""
                raise QueueError(f"cannot open the queue {path}{full}: {exc}", disk_full=bool(full)) from None
            moved = self._move_aside(f"cannot be read ({exc})")
            db, first = self._open_db()
        if moved is not None:
            log.error("queue %s moved to %s; a new queue is started (values in the moved file are not "
                      "recovered: see README, troubleshooting)", path, moved)
        if created or moved is not None:
            sync_directory(self.directory)  # the new file's name survives a power cut (vector#25779)
        return db, first

    def _open_db(self) -> tuple[sqlite3.Connection, int]:
        """Connect, make the tables if new, load the index; the connection is closed again if that fails."""
        db = self._connect()
        try:
            for statement in _SCHEMA:
                db.execute(statement)
            return db, self._load(db)
        except BaseException:
            db.close()
            raise

    def _load(self, db: sqlite3.Connection) -> int:
        """Read the index of unreleased records; returns the first unreleased seq.

        Nothing is kept unless the whole index reads: a file that fails half way
        is moved aside, and its records must not haunt the new queue.
        """
        row = db.execute("SELECT value FROM meta WHERE key = 'released'").fetchone()
        released = row[0] if row else 0
        if type(released) is not int:
            raise sqlite3.DatabaseError(f"malformed queue index: release watermark {released!r}")
        chunks: deque[_Chunk] = deque()
        walls: deque[tuple[int, float]] = deque()
        end, stored, recovered, after = released, 0, 0, 0
        for seq, n, size, t_wall in db.execute("SELECT seq, n, length(data), t_wall FROM chunks ORDER BY seq"):
            # A page SQLite reads back cut short (a truncated file) gives zeroed cells: NULLs, overlaps.
            if not (type(n) is int and n > 0 and type(size) is int and type(t_wall) is float) or seq < after:
                raise sqlite3.DatabaseError(f"malformed queue index: record {(seq, n, size, t_wall)!r} after {after}")
            after = seq + n
            if seq + n <= released:
                continue  # wholly released; deleted at the next commit
            chunks.append(_Chunk(seq, n, size))
            walls.append((seq + n, t_wall))
            stored += size
            end = max(end, seq + n)
            recovered += min(n, seq + n - released)
        cursors = dict(db.execute("SELECT key, position FROM cursors").fetchall())
        if not all(type(k) is str and type(v) is str for k, v in cursors.items()):
            raise sqlite3.DatabaseError("malformed queue index: cursors")
        self._chunks, self._oldest_wall, self._stored_bytes = chunks, walls, stored
        self._committed_end, self.recovered, self._cursors = end, recovered, cursors
        if recovered:
            log.warning("queue %s: %d values were queued and not written when the last run ended; "
                        "they are written first", self.directory / QUEUE_FILE, recovered)
        return released if chunks else end

    def _move_aside(self, why: str) -> Path:
        """Move the queue's files into corrupt/ (as PI moves a corrupt queue aside); returns the new name."""
        corrupt = self.directory / CORRUPT_DIR
        corrupt.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock.time()))
        target = corrupt / f"queue-{stamp}.db"
        for n in itertools.count(1):  # never over an earlier one moved aside within the same second
            if not any(target.with_name(target.name + s).exists() for s in ("", "-wal", "-shm")):
                break
            target = corrupt / f"queue-{stamp}-{n}.db"
        log.error("queue %s %s: moving it aside", self.directory / QUEUE_FILE, why)
        for suffix in ("", "-wal", "-shm"):
            src = self.directory / (QUEUE_FILE + suffix)
            if src.exists():
                src.rename(target.with_name(target.name + suffix))
        sync_directory(corrupt)
        sync_directory(self.directory)
        return target

    # -- life cycle --------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """End intake: later puts are refused; what is pending is committed at once. Idempotent."""
        with self._lock:
            self._closed = True
            self._room.notify_all()
            self._commit_wake.notify_all()
            self._interval.notify_all()
        self._ring.wake()  # (the ring itself stays open: the last commit still feeds it)

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self, timeout: float) -> Sequence[TagValue]:
        """Stop the commit thread after a last commit (releases too); close the files.

        Returns the rows that could not be made durable (a full or failing
        disk): the caller spools them or counts them. What stays queued is
        written first by the next run. Idempotent (a later call returns []).
        """
        self.close()
        with self._lock:
            if self._stopped:
                return []  # shut down already: idempotent
            self._stopped = True
            self._commit_wake.notify_all()
            self._interval.notify_all()
        if self._thread.ident is not None:
            self._thread.join(max(timeout, COMMIT_GRACE))
        if self._thread.is_alive():  # a hung disk: hand back what the thread does not hold
            log.error("queue: the commit thread did not end in %.1fs", max(timeout, COMMIT_GRACE))
            return self._take_pending()
        self._commit()  # on this thread now: anything released since the thread's last commit
        left = self._take_pending()
        for db in (self._db, self._reader):
            try:
                db.close()
            except sqlite3.Error as exc:
                log.error("queue: closing %s: %s", self.directory / QUEUE_FILE, exc)
        return left

    def _take_pending(self) -> Chunk:
        """The rows submitted and not made durable, taken out of the queue (for the caller to spool)."""
        with self._lock:
            left = Chunk.join([Chunk.of(p.rows) for p in self._pending]) if self._pending else Chunk([], [], [], [])
            self._pending.clear()
            self._pending_values = 0
        return left

    # -- producers ---------------------------------------------------------

    def put_many(
        self, rows: Sequence[TagValue], t_submit: float | None = None, *, cursor: tuple[str, str] | None = None
    ) -> PutResult:
        """Queue the rows of one submit; they settle (`settlement`) once their group commit is fsynced.

        At the cap (or while the disk is full) the overflow policy decides: see the module docstring.
        Values pushed out under `drop-oldest` come back as `popped` (to release once counted).
        """
        n = len(rows)
        rows = Chunk.of(rows)
        if t_submit is None:
            t_submit = self._clock.monotonic()
        dropped, popped = 0, (0, 0)
        with self._lock:
            if self._closed:
                return PutResult(0, refused=rows, end=self._next_seq)
            if n and self._over_cap(n):
                refusal = self._overflow(rows)
                if isinstance(refusal, PutResult):
                    return refusal
                dropped, popped = refusal
            if n or cursor is not None:
                self._pending.append(_Pending(self._next_seq, rows, t_submit, self._clock.time(), cursor))
                self._next_seq += n
                self._pending_values += n
                self._commit_wake.notify()
            return PutResult(n, dropped, end=self._next_seq, popped=popped)

    def _over_cap(self, n: int) -> bool:
        """True if `n` more values would pass `max_bytes`, or the disk is full (under the lock)."""
        if self.disk_full:
            return True
        if not self.max_bytes:
            return False
        used = self._stored_bytes + (self._pending_values + n) * ROW_ESTIMATE
        return used > self.max_bytes and bool(self._chunks or self._pending)

    def _overflow(self, rows: Sequence[TagValue]) -> PutResult | tuple[int, tuple[int, int]]:
        """The overflow policy at the cap (under the lock): a PutResult when the rows are not queued,
        else (values dropped to make room, their positions) and the rows are queued."""
        n = len(rows)
        if self.policy is OverflowPolicy.SPILL:
            self.overflowed += n
            return PutResult(0, evicted=rows, end=self._next_seq)
        if self.policy is OverflowPolicy.DROP_OLDEST:
            # The oldest values the writer has not taken yet; their records go with the commit after their release.
            evicted, first = self._ring.evict(n)
            self.overflowed += len(evicted) or n
            if not evicted:
                return PutResult(0, n, end=self._next_seq)
            return len(evicted), (first, first + len(evicted))
        deadline = self._clock.monotonic() + self.block_timeout  # block: wait for released room
        self.waiting += n
        self.blocked_puts += 1
        try:
            while self._over_cap(n) and not self._closed:
                remaining = deadline - self._clock.monotonic()
                if remaining <= 0.0:
                    self.overflowed += n
                    return PutResult(0, n, end=self._next_seq)
                self._room.wait(min(remaining, max(self.fsync_interval, 0.01)))
        finally:
            self.waiting -= n
        if self._closed:
            return PutResult(0, refused=rows, end=self._next_seq)
        return 0, (0, 0)

    def wait_for_room(self, n: int, timeout: float) -> bool:
        """Wait until `n` values fit under the cap and in the read-ahead, or the queue is closed (True);
        False on timeout.

        A source that can wait (a file) is held at the read-ahead: what it has not read yet needs no queue,
        and values that overtake the ring would be read back from disk, which costs more than waiting.
        A source that cannot wait (a plant protocol's live values) just submits: the queue grows on disk.
        """
        deadline = self._clock.monotonic() + timeout
        with self._lock:
            while not self._closed and (self._over_cap(n) or self._beyond_readahead(n)):
                remaining = deadline - self._clock.monotonic()
                if remaining <= 0.0:
                    return False
                self._room.wait(min(remaining, max(self.fsync_interval, 0.01)))
            return True

    def _beyond_readahead(self, n: int) -> bool:
        """True if `n` more values would not fit in the read-ahead with what waits for the writer (under the lock)."""
        waiting = self._pending_values + len(self._ring) + self._disk_only()
        return waiting > 0 and waiting + min(n, self._readahead) > self._readahead

    def resume_point(self, key: str) -> str | None:
        """The last durable cursor position stored under `key`."""
        with self._lock:
            return self._cursors.get(key)

    # -- the commit thread -------------------------------------------------

    def _run(self) -> None:
        """Group commit: wait for values; commit them with what is released once `fsync_interval` has passed
        since the last commit (values of the interval join one commit).

        One wake-up per commit: a value after a quiet spell is committed at once, the next ones wait out the
        rest of the interval. An idle queue persists releases every IDLE_PERSIST seconds; a failing disk is
        tried again every IDLE_RETRY seconds, not in a loop.
        """
        clock = self._clock
        last = float("-inf")  # clock.monotonic() of the last commit
        ok = True
        while True:
            with self._lock:
                if not (self._pending or self._stopped):  # (closed, it still persists what the writer releases)
                    self._commit_wake.wait(IDLE_PERSIST)  # on timeout: persist what was released meanwhile
                pause = (last + self.fsync_interval if ok else last + IDLE_RETRY) - clock.monotonic()
                if pause > 0.0 and not self._stopped and not (ok and self._closed):
                    self._interval.wait(pause)
                stopping = self._stopped
            last = clock.monotonic()
            ok = self._commit()
            if stopping:
                return

    def _commit(self) -> bool:
        """One group commit: new records, cursors, releases; then settle and feed the ring. False if it failed."""
        with self._lock:
            pending, self._pending = self._pending, []
            release = self._released.mark
            done, self._done = self._done, []
        drop_to = self._persisted_release
        if not pending and release == drop_to and not done:
            return True
        # (an idle thread with a release to persist arrives here too: one small transaction, no new records)
        records = []
        cursors: dict[str, str] = {}
        group: list[_Pending] = []  # submits of this commit joined into one record, up to RECORD_VALUES
        in_group = 0  # values in `group`
        for p in pending:
            if p.rows:
                n = len(p.rows)
                if group and in_group + n > RECORD_VALUES:
                    records.append(_record(group))
                    group, in_group = [], 0
                group.append(p)
                in_group += n
            if p.cursor is not None:
                cursors[p.cursor[0]] = p.cursor[1]
        if group:
            records.append(_record(group))
        # Spooled rows are on disk before a release forgets them, or a cursor moves past them.
        if (release != drop_to or done or cursors) and self.before_release is not None:
            try:
                self.before_release()
            except Exception as exc:  # the spool cannot sync: keep the records queued, try again next time
                log.error("queue: not releasing yet: %s", exc)
                release = drop_to
                with self._lock:
                    self._done[:0], done = done, []
        first_kept = self._first_kept(release)
        # Released ahead of the watermark (dropped under drop-oldest while the writer holds an older batch):
        # deleted one by one, or the cap would not hold.
        ahead = [c for c in done if c.seq >= first_kept]
        started = time.perf_counter()
        try:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if records:
                    db.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?)", records)
                if cursors:
                    db.executemany("INSERT OR REPLACE INTO cursors VALUES (?, ?)", cursors.items())
                if release != drop_to:
                    db.execute("DELETE FROM chunks WHERE seq < ?", (first_kept,))
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('released', ?)", (release,))
                if ahead:
                    db.executemany("DELETE FROM chunks WHERE seq = ?", [(c.seq,) for c in ahead])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            with self._lock:
                self._pending[:0] = pending  # nothing is lost: tried again next time
                self._done[:0] = done
            self._commit_failed(exc)
            return False
        self._fsync_times.append(time.perf_counter() - started)
        self._committed(pending, records, cursors, release, ahead)
        if (release != drop_to or ahead) and not self._chunks:
            self._reclaim()
        return True

    def _reclaim(self) -> None:
        """The queue is empty: give free pages back to the file system once there are many."""
        try:
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
            if free >= VACUUM_PAGES:
                self._db.executescript("PRAGMA incremental_vacuum;")  # sqlite3_exec steps it to the end
        except sqlite3.Error as exc:
            log.warning("queue: cannot give free space back: %s", exc)

    def _first_kept(self, release: int) -> int:
        """The seq of the first record not wholly below `release` (the DELETE keeps it and what follows)."""
        with self._lock:
            for chunk in self._chunks:
                if chunk.seq + chunk.n > release:
                    return chunk.seq
        return release

    def _commit_failed(self, exc: sqlite3.Error) -> None:
        full = _is_disk_full(exc)
        with self._lock:
            was = self.disk_full
            self.disk_full = True  # the overflow policy decides for new values until a commit works
        now = self._clock.monotonic()
        if not was or now - self._error_logged >= ERROR_LOG_INTERVAL:
            self._error_logged = now
            what = "the disk is full" if full else f"cannot write ({exc})"
            log.error("QUEUE: %s at %s: %d values wait in memory; new values follow the overflow policy "
                      "(%s); trying again", what, self.directory / QUEUE_FILE, self._pending_values, self.policy)

    def _committed(
        self, pending: list[_Pending], records: list[tuple[int, int, float, int, bytes]],
        cursors: dict[str, str], release: int, deleted: list[_Chunk],
    ) -> None:
        """After a commit: account, settle the receipts, feed the ring, wake who waits for room."""
        n = sum(len(p.rows) for p in pending)
        with self._lock:
            if self.disk_full:
                self.disk_full = False
                log.warning("QUEUE: writing again to %s", self.directory / QUEUE_FILE)
            self.commits += 1
            self._pending_values -= n
            self.acknowledged += n
            self._cursors.update(cursors)
            for seq, count, t_wall, _crc, data in records:
                self._chunks.append(_Chunk(seq, count, len(data)))
                self._oldest_wall.append((seq + count, t_wall))
                self._stored_bytes += len(data)
            if pending:
                self._committed_end = pending[-1].seq + len(pending[-1].rows)
            for chunk in deleted:  # (near the front: the oldest values are dropped)
                self._chunks.remove(chunk)
                self._stored_bytes -= chunk.size
            self._forget_released(release)
            self._persisted_release = release
            if self._disk_from is None:  # else the ring is behind the disk: the writer reads these back in order
                for p in pending:
                    if not p.rows:
                        continue
                    if len(self._ring) + len(p.rows) > self._readahead and len(self._ring):
                        self._disk_from = p.seq
                        break
                    self._ring.put_many(p.rows, p.t_submit)
            self._room.notify_all()
        if pending:
            self.settlement.advance(pending[-1].seq + len(pending[-1].rows))

    def _forget_released(self, release: int) -> None:
        """Drop wholly released records from the index (under the lock)."""
        while self._chunks and self._chunks[0].seq + self._chunks[0].n <= release:
            chunk = self._chunks.popleft()
            self._stored_bytes -= chunk.size
        while self._oldest_wall and self._oldest_wall[0][0] <= release:
            self._oldest_wall.popleft()

    # -- the writer --------------------------------------------------------

    def __len__(self) -> int:
        """Values not yet taken by the writer: pending, in the ring, and on disk only."""
        return self._pending_values + len(self._ring) + self._disk_only()

    def _disk_only(self) -> int:
        start = self._disk_from
        return 0 if start is None else max(0, self._committed_end - start)

    @property
    def capacity(self) -> int:
        """Values the read-ahead ring holds at most."""
        return self._readahead

    @property
    def tail(self) -> int:
        return self._next_seq

    def wait_ready(self, batch_size: int, max_age: float, timeout: float) -> int:
        """As `RingBuffer.wait_ready`, over durable values; waits for a commit when only pending ones exist."""
        self._refill()
        if not len(self._ring) and self._pending_values:
            timeout = max(timeout, self.fsync_interval or 0.01)  # a commit is on its way: no busy loop
        n = self._ring.wait_ready(batch_size, max_age, timeout)
        return n + self._disk_only()

    def batch_due(self, batch_size: int, max_age: float) -> bool:
        if self._disk_only():
            return True  # the ring is full behind the disk
        return self._ring.batch_due(batch_size, max_age)

    def wake(self) -> None:
        self._ring.wake()

    def drain(self, max_n: int) -> Batch:
        """Take up to `max_n` durable values, oldest first (reading back from disk what the ring lacks)."""
        self._refill()
        return self._ring.drain(max_n)

    def release(self, start: int, end: int) -> None:
        """Values `start` .. `end - 1` are settled; their records are deleted with the next commit."""
        self._released.settle(start, end)
        with self._lock:
            self.released_total += max(0, end - start)
            for chunk in self._chunks:
                if chunk.seq >= end:
                    break
                overlap = min(end, chunk.seq + chunk.n) - max(start, chunk.seq)
                if overlap > 0:
                    chunk.done += overlap
                    if chunk.done >= chunk.n > chunk.done - overlap:
                        self._done.append(chunk)
            if self.max_bytes or self.disk_full:
                self._commit_wake.notify()

    def oldest_age(self) -> float:
        """Seconds since the oldest unreleased value was submitted (0 when empty)."""
        with self._lock:
            if self._oldest_wall:
                return max(0.0, self._clock.time() - self._oldest_wall[0][1])
            if self._pending:
                return max(0.0, self._clock.monotonic() - self._pending[0].t_submit)
        return 0.0

    def _refill(self) -> None:
        """Read records back from disk into the ring while it has room (writer thread).

        The ring numbers its rows one after the other, so positions no value
        fills (a record moved aside, records deleted ahead of the watermark)
        are passed over only while it is empty: by a new ring that starts after
        them. Only this thread empties it, and while the ring is behind the
        disk nothing else fills it.
        """
        while True:
            with self._lock:
                start = self._disk_from
                room = self._readahead - len(self._ring)
                if start is None or room <= 0:
                    return
                wanted = _fitting((c for c in self._chunks if c.seq + c.n > start), room)
                empty = not len(self._ring)
            if not wanted:
                with self._lock:
                    self._disk_from = None
                return
            loaded, after = self._read(wanted, start, may_skip=empty)
            with self._lock:
                if self._disk_from != start:
                    return
                for rows, t_submit in loaded:
                    self._ring.put_many(rows, t_submit)
                if not loaded and after > start:  # unreadable positions, settled and counted: passed over
                    self._ring = RingBuffer(UNBOUNDED, OverflowPolicy.DROP_OLDEST, clock=self._clock, start=after)
                    self._ring.wake()  # (a wake() the old ring got is not lost)
                self._disk_from = after if after < self._committed_end else None
                if after == start:
                    return

    def _read(
        self, wanted: list[_Chunk], start: int, *, may_skip: bool,
    ) -> tuple[list[tuple[Chunk, float]], int]:
        """Decode the records `wanted` (`_fitting` chose them to fit the ring's room) from `start` on; returns
        them and where the next read starts. Positions no record gives (a record that cannot be trusted: settled
        and counted; or released ahead of the watermark: settled) end the read; they are passed over (returned
        alone) when `may_skip` and nothing precedes them. A read that fails (not a bad record: a lock, a closed
        file) ends the read too; what it missed stays queued for the next."""
        out: list[tuple[Chunk, float]] = []
        now_mono, now_wall = self._clock.monotonic(), self._clock.time()
        fetched = self._fetch(wanted)
        for chunk in wanted:
            if chunk.seq > start:  # released by the last run ahead of its watermark: those records were deleted
                if out or not may_skip:
                    break
                self._released.settle(start, chunk.seq)
                return [], chunk.seq
            try:
                rows, t_wall = self._read_one(chunk, fetched.get(chunk.seq))
            except _BadRecord as bad:
                if out or not may_skip:
                    break  # read again (and dealt with) once the ring is empty
                self._keep_corrupt(chunk, start, chunk.seq + chunk.n, bad)
                return [], chunk.seq + chunk.n
            except sqlite3.Error as exc:
                self._read_failed(exc)
                break
            out.append((rows[start - chunk.seq:], now_mono - max(0.0, now_wall - t_wall)))
            start = chunk.seq + chunk.n
        return out, start

    def _fetch(self, wanted: list[_Chunk]) -> dict[int, tuple[object, ...]]:
        """The stored rows of `wanted` in one query (one per record costs more than decoding small ones);
        empty if that query fails: `_read_one` then reads (and judges) each record alone."""
        try:
            rows = self._reader.execute(
                "SELECT seq, n, t_wall, crc, data FROM chunks WHERE seq BETWEEN ? AND ?",
                (wanted[0].seq, wanted[-1].seq)).fetchall()
        except sqlite3.Error:
            return {}
        return {row[0]: row[1:] for row in rows}

    def _read_one(self, chunk: _Chunk, fetched: tuple[object, ...] | None = None) -> tuple[Chunk, float]:
        """The rows of a record and its wall time; _BadRecord if it cannot be trusted, sqlite3.Error if it
        cannot be read now. `fetched` is its stored row when `_fetch` got it."""
        data = None
        try:
            row = fetched if fetched is not None else self._reader.execute(
                "SELECT n, t_wall, crc, data FROM chunks WHERE seq = ?", (chunk.seq,)).fetchone()
            if row is None:
                raise ChunkError("record missing")
            n, t_wall, crc, data = row
            if type(data) is not bytes or type(t_wall) is not float:
                raise ChunkError("malformed record")
            if n != chunk.n or crc != chunk_crc(chunk.seq, n, data):
                raise ChunkError("CRC mismatch")
            return decode_chunk(data, n), t_wall
        except (ChunkError, UnicodeDecodeError) as exc:
            raise _BadRecord(str(exc), data if isinstance(data, bytes) else None) from exc
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise
            raise _BadRecord(str(exc), None) from exc

    def _keep_corrupt(self, chunk: _Chunk, start: int, end: int, bad: _BadRecord) -> None:
        """Positions `start` .. `end - 1` cannot be read back: keep the record's bytes, settle and count them."""
        n = end - start
        with self._lock:
            self.corrupt += n
        corrupt = self.directory / CORRUPT_DIR
        target = corrupt / f"record-{chunk.seq}-{chunk.n}.bin"
        try:
            corrupt.mkdir(exist_ok=True)
            if bad.data is not None:
                _write_durably(target, bad.data)  # before the release deletes the record
                sync_directory(corrupt)
                sync_directory(self.directory)
        except OSError as err:
            log.error("queue: cannot keep a corrupt record in %s: %s", corrupt, err)
        kept = f"kept in {target}" if bad.data is not None else "nothing to keep"
        log.error("queue: %d values at positions %d .. %d cannot be trusted (%s): %s, counted as dropped "
                  "(corrupt)", n, start, end - 1, bad, kept)
        self._released.settle(start, end)
        if self.on_corrupt is not None:
            self.on_corrupt(n)

    def _read_failed(self, exc: sqlite3.Error) -> None:
        now = self._clock.monotonic()
        if now - self._read_error_logged >= ERROR_LOG_INTERVAL:
            self._read_error_logged = now
            log.error("queue: cannot read back from %s now (%s); the values stay queued", self.directory / QUEUE_FILE,
                      exc)

    # -- reading -----------------------------------------------------------

    def queued(self) -> int:
        """Values queued, durable or pending (in flight with the writer too): `stats()`'s values + pending."""
        with self._lock:
            return self._durable_values() + self._pending_values

    def _durable_values(self) -> int:
        """Durable values not released (under the lock). Not `committed_end - watermark`: ranges released
        ahead of it (values dropped under drop-oldest while the writer holds an older batch) are no longer queued."""
        return max(0, self.recovered + self.acknowledged - self.released_total - self.corrupt)

    def stats(self) -> QueueStats:
        times = sorted(self._fsync_times)
        with self._lock:
            values = self._durable_values()
            stored, pending = self._stored_bytes, self._pending_values
        return QueueStats(
            values=values, bytes=stored, pending=pending, oldest_age=self.oldest_age(),
            acknowledged=self.acknowledged, released=self.released_total, recovered=self.recovered,
            corrupt=self.corrupt, torn_tails=self.torn_tails, commits=self.commits,
            fsync_p50=_quantile(times, 0.5), fsync_p99=_quantile(times, 0.99),
            disk_full=self.disk_full, max_bytes=self.max_bytes,
        )


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fitting(chunks: Iterable[_Chunk], room: int) -> list[_Chunk]:
    """The first records of `chunks` that fit in `room` values (at least one), READ_CHUNKS at most: what one
    read fetches (a record the ring has no room for would be read, and read again by the next fill)."""
    out: list[_Chunk] = []
    taken = 0
    for chunk in chunks:
        if out and (taken + chunk.n > room or len(out) >= READ_CHUNKS):
            break
        out.append(chunk)
        taken += chunk.n
    return out


def _record(group: list[_Pending]) -> tuple[int, int, float, int, bytes]:
    """One record of consecutive submits (their positions follow each other): fewer, larger records cost less
    to write, index, read back and decode than one per submit (a polling group of 100 values)."""
    first = group[0]
    rows = Chunk.join([Chunk.of(p.rows) for p in group])
    data = encode_chunk(rows)
    return first.seq, len(rows), first.t_wall, chunk_crc(first.seq, len(rows), data), data


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _is_disk_full(exc: sqlite3.Error) -> bool:
    """SQLITE_FULL, or no room to grow the WAL index (-shm) that a WAL file needs even to be read."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_SHMSIZE) or "disk is full" in str(exc)


def _is_corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or "malformed" in str(exc) or (
        "not a database" in str(exc))
