"""Benchmark: which engine should hold the durable queue: SQLite WAL, LMDB, or a home-made append-only file.

Not collected by pytest. Run:

    python tests/benchmarks/bench_queue_engines.py [--quick] [--rounds 3] [--values 2000000] [--ack-rounds 2]
                                                   [--dir PATH] [--json out.json]

`--quick` (~15 s instead of ~80 s): 500,000 values, 2 rounds, one 0.6 s acknowledgement round.

The pattern measured is the queue's: the producer (here the main thread)
encodes each polling group into one record (tags joined by U+001F as UTF-8,
then array('q') timestamps in µs, array('d') values, array('q') qualities:
~41 B a value) and hands it over; a commit thread, every `fsync_interval`
(immediately if the last commit overran), writes every pending record as one
durable transaction (fsync) and releases what the writer has finished with;
a writer thread reads the durable records back in order, decodes them (where
the database write would follow) and moves the release watermark, which the
next commit applies. At most 100,000 values (buffer.capacity's default) are
in flight (submitted, not released): back-pressure beyond, so at max rate a
commit carries up to 100,000 values and the rate cannot pass
capacity / fsync_interval (2 M/s at 50 ms). Tag names are 12 to 21 chars.

Engines, each in a fresh folder per run on `--dir` (default: the folder
holding the checkout, the project disk; /tmp may be tmpfs elsewhere):
- sqlite: stdlib sqlite3, WAL, synchronous=FULL, `chunks(seq INTEGER PRIMARY
  KEY, n, crc, data BLOB)`, executemany INSERT + COMMIT per group commit; the
  release is `DELETE FROM chunks WHERE seq < ?` in the next commit;
  wal_autocheckpoint at its default (1,000 pages), and as `sqlite-ckpt10k`;
- lmdb: sync=True (metasync too), one write txn per group commit, key = seq
  big-endian, value = crc32 + record; the release deletes in the next txn;
- file: the baseline, what the disk gives: frames (length, crc32) appended to
  8 MiB segments, one os.write + os.fsync per group commit; a segment is
  unlinked once all its records are released.

Figures:
- max rate, groups of 100 and 1,000 values, fsync_interval 50 ms, rounds
  alternating the engine order: values/s end to end (median of rounds, ratio
  to the file baseline); engine capacity = values / time inside commit calls;
  commit latency (write + fsync) p50/p99 and peak disk use, pooled over rounds;
- bytes on disk per value: 100,000 values queued, none released (allocated
  blocks of every file the engine keeps), engine open and after close; and
  with 20-char names, where a record of 100 values outgrows one 4 KiB page
  (LMDB then takes two overflow pages for it);
- acknowledgement latency (submit to durable) p50/p99 at the target rate of
  100,000 values/s for each candidate fsync_interval, pooled over
  `--ack-rounds` (target: p99 <= interval + 20 ms);
- truncation: 200 records in 20 commits, then (in a copy) the file the last
  commit wrote cut 100 bytes short ("torn tail": for SQLite the WAL image a
  killed process leaves) and the main file cut near its middle after a clean
  close; each copy is opened and read back in a child process, so a SIGBUS
  shows as the child's death, not ours;
- raw os.fsync latency of a 4 KiB append on the project disk, /tmp and
  /dev/shm, interleaved.
Targets: >= 100,000 values/s end to end, p99 acknowledgement <= interval + 20 ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, BinaryIO, Protocol

try:
    import lmdb  # optional here: the bench measures it only where it is installed; unbound if LMDB_MISSING
except ImportError as exc:
    LMDB_MISSING = f"lmdb skipped: not importable ({exc}); `pip install lmdb` to measure it"
else:
    LMDB_MISSING = ""

QUALITY = 192
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in µs
CAPACITY = 100_000  # values in flight, as buffer.capacity's default: a commit carries at most this many
POOL_VALUES = 200_000  # distinct values a max-rate run cycles through
MAX_RATE_INTERVAL = 0.050
INTERVALS = (0.010, 0.025, 0.050, 0.100)
ACK_SLACK = 0.020
TARGET_RATE = 100_000
SQLITE_BIG_CHECKPOINT = 10_000  # pages, ~40 MB of WAL, vs the default 1,000
LMDB_MAP_SIZE = 1 << 30
SEGMENT_BYTES = 8 << 20
FOOTPRINT_VALUES = 100_000
CUT_FROM_END = 100  # bytes: inside the last record or page of every engine's tail file

HEADER = struct.Struct("<II")  # values in the group, bytes of the joined tag names
FRAME = struct.Struct("<II")  # the file engine's frame: payload length, crc32 of the payload
LMDB_KEY = struct.Struct(">Q")  # big-endian: byte order is seq order, so appends go to the B-tree's right edge
LMDB_CRC = struct.Struct("<I")
SEP = "\x1f"
KINDS = ("", "pv.", "flow.", "level.", "press.pv.")  # tag names of 12, 15, 17, 18 and 21 chars

Group = tuple[list[str], list[int], list[float], list[int]]


class CorruptRecord(Exception):
    """A record that is missing, torn or fails its crc."""


# -- records -------------------------------------------------------------------


def encode(group: Group) -> bytes:
    """One polling group as one record (native byte order: the queue never leaves the machine)."""
    tags, ts, values, quality = group
    names = SEP.join(tags).encode()
    return b"".join((HEADER.pack(len(tags), len(names)), names, array("q", ts).tobytes(),
                     array("d", values).tobytes(), array("q", quality).tobytes()))


def decode(blob: bytes) -> tuple[list[str], array[int], array[float], array[int]]:
    """The group back from `encode`; raises CorruptRecord if the lengths disagree."""
    n, k = HEADER.unpack_from(blob)
    view = memoryview(blob)
    at = HEADER.size + k
    tags = str(view[HEADER.size:at], "utf-8").split(SEP)
    ts, values, quality = array("q"), array("d"), array("q")
    for column in (ts, values, quality):
        column.frombytes(view[at:at + 8 * n])
        at += 8 * n
    if len(tags) != n or at != len(blob) or len(quality) != n:
        raise CorruptRecord("record does not match its header")
    return tags, ts, values, quality


def make_groups(values: int, size: int, lines: int = 10, kinds: Sequence[str] = KINDS) -> list[Group]:
    """Polls of `lines` groups of `size` tags (names of 12 to 21 chars), each group polled every 100 ms."""
    names = [[f"unit{g:02d}.{kinds[i % len(kinds)]}{i:04d}" for i in range(size)] for g in range(lines)]
    quality = [QUALITY] * size
    groups: list[Group] = []
    for k in range(-(-values // size)):
        ts = T0 + 100_000 * (k // lines) + 17 * (k % lines)
        groups.append((names[k % lines], [ts] * size, [20.0 + ((k * 7 + i) % 1000) * 0.01 for i in range(size)],
                       quality))
    return groups


# -- engines -------------------------------------------------------------------


class Engine(Protocol):
    """A durable queue store. Records get consecutive seqs from 1; `commit` is one durable transaction.

    `commit` runs on the commit thread, `read` on the writer thread (in seq order).
    """

    last_seq: int

    def commit(self, blobs: Sequence[bytes], release_below: int) -> int:
        """Append `blobs` durably, release every record with seq < `release_below`; return the last seq."""
        ...

    def read(self, first: int, last: int) -> list[bytes]:
        """Records `first`..`last`, each checked against its crc; raises CorruptRecord."""
        ...

    def close(self) -> None: ...


class SqliteQueue:
    """The queue in one SQLite table, WAL + synchronous=FULL, a second connection for the reader."""

    def __init__(self, directory: Path, autocheckpoint: int | None = None) -> None:
        path = directory / "queue.db"
        self._w = self._connect(path, autocheckpoint)
        self._r = self._connect(path, None)
        self._w.execute("CREATE TABLE IF NOT EXISTS chunks "
                        "(seq INTEGER PRIMARY KEY, n INTEGER, crc INTEGER, data BLOB)")
        (last,) = self._w.execute("SELECT max(seq) FROM chunks").fetchone()
        self.last_seq = last or 0
        self._released = 0

    @staticmethod
    def _connect(path: Path, autocheckpoint: int | None) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        if autocheckpoint is not None:
            conn.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint)}")
        return conn

    def commit(self, blobs: Sequence[bytes], release_below: int) -> int:
        first = self.last_seq + 1
        rows = [(first + i, HEADER.unpack_from(b)[0], zlib.crc32(b), b) for i, b in enumerate(blobs)]
        self._w.execute("BEGIN")
        if release_below > self._released:
            self._w.execute("DELETE FROM chunks WHERE seq < ?", (release_below,))
            self._released = release_below
        self._w.executemany("INSERT INTO chunks (seq, n, crc, data) VALUES (?, ?, ?, ?)", rows)
        self._w.execute("COMMIT")
        self.last_seq += len(blobs)
        return self.last_seq

    def read(self, first: int, last: int) -> list[bytes]:
        out: list[bytes] = []
        cur = self._r.execute("SELECT seq, crc, data FROM chunks WHERE seq BETWEEN ? AND ? ORDER BY seq", (first, last))
        for seq, crc, data in cur:
            out.append(checked(seq, first + len(out), data, crc))
        if len(out) != last - first + 1:
            raise CorruptRecord(f"record {first + len(out)} is missing")
        return out

    def close(self) -> None:
        self._r.close()
        self._w.close()


class LmdbQueue:
    """The queue in one LMDB database, sync=True: every write txn is durable when it returns.

    `check_size`: refuse a data.mdb shorter than its meta page says, before any
    read touches a page past the end of the file (LMDB reads through mmap: SIGBUS).
    """

    def __init__(self, directory: Path, check_size: bool = False) -> None:
        if LMDB_MISSING:
            raise RuntimeError(LMDB_MISSING)
        self._env = lmdb.open(str(directory), map_size=LMDB_MAP_SIZE, sync=True, metasync=True)
        if check_size:
            self._check_size(directory / "data.mdb")
        with self._env.begin() as txn:
            cur = txn.cursor()
            self.last_seq = LMDB_KEY.unpack(cur.key())[0] if cur.last() else 0
        self._released = 0

    def _check_size(self, path: Path) -> None:
        needed = (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]
        if path.stat().st_size < needed:
            self._env.close()
            raise CorruptRecord(f"{path.name} holds {path.stat().st_size:,} B, its meta page needs {needed:,}")

    def commit(self, blobs: Sequence[bytes], release_below: int) -> int:
        first = self.last_seq + 1
        items = [(LMDB_KEY.pack(first + i), LMDB_CRC.pack(zlib.crc32(b)) + b) for i, b in enumerate(blobs)]
        with self._env.begin(write=True) as txn:
            cur = txn.cursor()
            if release_below > self._released and cur.first():
                stop = LMDB_KEY.pack(release_below)
                while cur.key() and cur.key() < stop and cur.delete():
                    pass
                self._released = release_below
            cur.putmulti(items, append=True)
        self.last_seq += len(blobs)
        return self.last_seq

    def read(self, first: int, last: int) -> list[bytes]:
        out: list[bytes] = []
        with self._env.begin() as txn:
            cur = txn.cursor()
            if cur.set_range(LMDB_KEY.pack(first)):
                for key, value in cur:
                    seq = LMDB_KEY.unpack(key)[0]
                    if seq > last:
                        break
                    out.append(checked(seq, first + len(out), value[LMDB_CRC.size:],
                                       LMDB_CRC.unpack_from(value)[0]))
        if len(out) != last - first + 1:
            raise CorruptRecord(f"record {first + len(out)} is missing")
        return out

    def close(self) -> None:
        self._env.close()


class FileQueue:
    """The home-made baseline: (length, crc32) frames appended to segment files, os.fsync per commit.

    Opening scans every frame and cuts a torn tail (what a real one would have
    to do before appending again). Reads are sequential, as the queue's are.
    """

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._lock = threading.Lock()  # the segment list: the commit thread unlinks, the reader looks up
        self._segments: list[tuple[int, Path]] = []
        self.last_seq = 0
        self._recover()
        if not self._segments:
            self._segments.append((1, self._segment_path(1)))
        self._fd = os.open(self._segments[-1][1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._reader: BinaryIO | None = None
        self._read_next = self._segments[0][0]

    def _segment_path(self, first: int) -> Path:
        return self._dir / f"seg-{first:016d}.log"

    def _recover(self) -> None:
        """Count the good frames of each segment; cut the first torn one there and drop any after it."""
        for path in sorted(self._dir.glob("seg-*.log")):
            if self._segments and self.last_seq + 1 != int(path.stem[4:]):
                path.unlink()
                continue
            with open(path, "rb") as fh:
                good, frames = scan_frames(fh)
            self._segments.append((int(path.stem[4:]), path))
            self.last_seq = self._segments[-1][0] + frames - 1
            if good < path.stat().st_size:
                os.truncate(path, good)

    def commit(self, blobs: Sequence[bytes], release_below: int) -> int:
        if self._size >= SEGMENT_BYTES:
            self._roll()
        data = b"".join(FRAME.pack(len(b), zlib.crc32(b)) + b for b in blobs)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)
        self._size += len(data)
        self.last_seq += len(blobs)
        self._release(release_below)
        return self.last_seq

    def _roll(self) -> None:
        first = self.last_seq + 1
        path = self._segment_path(first)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        dir_fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new name must be durable before records in it are acknowledged
        finally:
            os.close(dir_fd)
        os.close(self._fd)
        self._fd, self._size = fd, 0
        with self._lock:
            self._segments.append((first, path))

    def _release(self, release_below: int) -> None:
        with self._lock:
            while len(self._segments) > 1 and self._segments[1][0] <= release_below:
                self._segments.pop(0)[1].unlink()

    def read(self, first: int, last: int) -> list[bytes]:
        if first != self._read_next:
            raise ValueError(f"the file queue reads in order: asked {first}, next is {self._read_next}")
        out: list[bytes] = []
        for seq in range(first, last + 1):
            blob = read_frame(self._reader) if self._reader else None
            if blob is None:  # the end of a segment: the next one starts at this seq
                self._open_reader(seq)
                blob = read_frame(self._reader) if self._reader else None
            if blob is None:
                raise CorruptRecord(f"record {seq} is missing")
            out.append(blob)
            self._read_next = seq + 1
        return out

    def _open_reader(self, seq: int) -> None:
        with self._lock:
            path = next((p for first, p in self._segments if first == seq), None)
        if path is None:
            raise CorruptRecord(f"no segment starts at record {seq}")
        if self._reader:
            self._reader.close()
        self._reader = open(path, "rb")  # noqa: SIM115 (held across calls, closed in close())

    def close(self) -> None:
        if self._reader:
            self._reader.close()
        os.close(self._fd)


def read_frame(fh: BinaryIO) -> bytes | None:
    """The next frame's payload; None at a clean end; raises CorruptRecord for a torn or bad frame."""
    header = fh.read(FRAME.size)
    if not header:
        return None
    if len(header) < FRAME.size:
        raise CorruptRecord("torn frame header")
    n, crc = FRAME.unpack(header)
    data = fh.read(n)
    if len(data) < n:
        raise CorruptRecord("torn frame")
    if zlib.crc32(data) != crc:
        raise CorruptRecord("frame fails its crc")
    return data


def scan_frames(fh: BinaryIO) -> tuple[int, int]:
    """(offset after the last good frame, good frames) of a segment."""
    good = frames = 0
    while True:
        try:
            if read_frame(fh) is None:
                return good, frames
        except CorruptRecord:
            return good, frames
        good, frames = fh.tell(), frames + 1


def checked(seq: int, expected: int, data: bytes, crc: int) -> bytes:
    if seq != expected:
        raise CorruptRecord(f"record {expected} is missing")
    if zlib.crc32(data) != crc:
        raise CorruptRecord(f"record {seq} fails its crc")
    return bytes(data)


ENGINES: dict[str, Callable[[Path], Engine]] = {
    "sqlite": SqliteQueue,
    "sqlite-ckpt10k": lambda d: SqliteQueue(d, SQLITE_BIG_CHECKPOINT),
    "lmdb": LmdbQueue,
    "file": FileQueue,
}
BASELINE = "file"
#: Opened only by the truncation probes: LMDB with the size check a queue on it would need.
CHECKED = {"lmdb": lambda d: LmdbQueue(d, check_size=True)}


def disk_bytes(directory: Path) -> int:
    """Allocated bytes of every file in `directory` (what `du` says, not the apparent sizes)."""
    total = 0
    for entry in os.scandir(directory):
        try:
            total += entry.stat().st_blocks * 512
        except FileNotFoundError:  # a segment released meanwhile
            continue
    return total


# -- the group-commit run --------------------------------------------------------


class GroupCommit:
    """One run of the queue's pattern on `engine`: producer -> commit thread -> writer thread -> release.

    One lock guards the hand-over state; `not_full` is the back-pressure on
    values in flight, `durable_grew` wakes the writer after a commit.
    """

    def __init__(self, engine: Engine, directory: Path, interval: float) -> None:
        self.engine, self.directory, self.interval = engine, directory, interval
        self.lock = threading.Lock()
        self.not_full = threading.Condition(self.lock)
        self.durable_grew = threading.Condition(self.lock)
        self.produced = threading.Event()
        self.pending: list[tuple[bytes, float]] = []
        self.inflight = 0
        self.durable = engine.last_seq
        self.release_below = 1
        self.committing = True
        self.values_read = 0
        self.commit_s: list[float] = []
        self.ack_s: list[float] = []
        self.read_s = 0.0
        self.peak_bytes = 0

    def submit(self, blob: bytes, n: int) -> None:
        with self.not_full:
            while self.inflight + n > CAPACITY:
                self.not_full.wait()
            self.pending.append((blob, time.perf_counter()))
            self.inflight += n

    def commit_loop(self) -> None:
        """Every `interval` (at once if the last commit overran): commit what is pending, then release."""
        tick = time.perf_counter() + self.interval
        while True:
            done = self.produced.wait(max(0.0, tick - time.perf_counter()))
            with self.lock:
                batch, self.pending = self.pending, []
                release = self.release_below
            if not batch and done:
                break
            tick = max(tick + self.interval, time.perf_counter())
            if batch:
                self._commit(batch, release)
        with self.lock:
            self.committing = False
            self.durable_grew.notify()

    def _commit(self, batch: list[tuple[bytes, float]], release: int) -> None:
        t = time.perf_counter()
        last = self.engine.commit([blob for blob, _ in batch], release)
        end = time.perf_counter()
        self.commit_s.append(end - t)
        self.ack_s.extend(end - submitted for _, submitted in batch)
        self.peak_bytes = max(self.peak_bytes, disk_bytes(self.directory))
        with self.lock:
            self.durable = last
            self.durable_grew.notify()

    def write_loop(self) -> None:
        """Read the durable records in order, decode them, then move the release watermark."""
        read_next = 1
        while True:
            with self.lock:
                while self.durable < read_next and self.committing:
                    self.durable_grew.wait()
                last = self.durable
            if last < read_next:
                return
            t = time.perf_counter()
            n = sum(len(decode(blob)[0]) for blob in self.engine.read(read_next, last))
            self.read_s += time.perf_counter() - t
            read_next = last + 1
            with self.lock:
                self.release_below = read_next
                self.inflight -= n
                self.values_read += n
                self.not_full.notify_all()

    def run(self, groups: Sequence[Group], count: int, pace: float = 0.0) -> dict[str, Any]:
        """Submit `count` groups, cycling through `groups` (one every `pace` seconds, or flat out); wait until
        the writer has read them all."""
        threads = [threading.Thread(target=self.commit_loop, name="commit"),
                   threading.Thread(target=self.write_loop, name="writer")]
        for thread in threads:
            thread.start()
        t0 = time.perf_counter()
        for k in range(count):
            if pace and (delay := t0 + k * pace - time.perf_counter()) > 0:
                time.sleep(delay)
            group = groups[k % len(groups)]
            self.submit(encode(group), len(group[0]))
        self.produced.set()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - t0
        total = count * len(groups[0][0])
        if self.values_read != total:
            raise RuntimeError(f"read back {self.values_read} of {total} values")
        return {"rate": total / elapsed, "seconds": elapsed, "engine_rate": total / sum(self.commit_s),
                "read_rate": total / self.read_s if self.read_s else 0.0, "commit_s": self.commit_s,
                "ack_s": self.ack_s, "peak_bytes": self.peak_bytes, "per_commit": total / len(self.commit_s)}


def run_engine(key: str, work: Path, groups: Sequence[Group], count: int, interval: float,
               pace: float = 0.0) -> dict[str, Any]:
    """A fresh engine in a fresh folder, one GroupCommit run, the folder removed."""
    directory = work / key
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    engine = ENGINES[key](directory)
    try:
        return GroupCommit(engine, directory, interval).run(groups, count, pace)
    finally:
        engine.close()
        shutil.rmtree(directory, ignore_errors=True)


def percentile(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else float("nan")


# -- footprint and truncation ------------------------------------------------------


def fill(key: str, directory: Path, groups: Sequence[Group], per_commit: int) -> Engine:
    """A fresh engine holding `groups`, `per_commit` records a commit, none released; left open."""
    directory.mkdir(parents=True)
    engine = ENGINES[key](directory)
    blobs = [encode(g) for g in groups]
    for i in range(0, len(blobs), per_commit):
        engine.commit(blobs[i:i + per_commit], 0)
    return engine


def footprint(key: str, work: Path, groups: Sequence[Group], per_commit: int) -> tuple[float, float]:
    """Bytes on disk per value with `groups` queued (none released): engine open, then closed.

    They differ for SQLite: closing checkpoints the WAL into the database and deletes it.
    """
    directory = work / f"{key}-footprint"
    values = sum(len(g[0]) for g in groups)
    engine = fill(key, directory, groups, per_commit)
    try:
        held = disk_bytes(directory) / values
    finally:
        engine.close()
    closed = disk_bytes(directory) / values
    shutil.rmtree(directory)
    return held, closed


def tail_file(key: str, directory: Path) -> Path:
    """The file an engine's last commit wrote: the WAL for SQLite, data.mdb, the last segment."""
    if key.startswith("sqlite"):
        return directory / "queue.db-wal"
    if key == "lmdb":
        return directory / "data.mdb"
    return sorted(directory.glob("seg-*.log"))[-1]


def main_file(key: str, directory: Path) -> Path:
    return directory / "queue.db" if key.startswith("sqlite") else tail_file(key, directory)


def copy_image(src: Path, dest: Path) -> None:
    """The files as a crash would leave them; the shared-memory index and lock files are rebuilt on open."""
    dest.mkdir()
    for path in src.iterdir():
        if not path.name.endswith(("-shm", "lock.mdb")):
            shutil.copyfile(path, dest / path.name)


def probe(key: str, checked: bool, directory: str, records: int, conn: Connection) -> None:
    """In a child process: open the queue at `directory`, read its records in order, send what happened."""
    result: dict[str, Any] = {"opened": False, "last_seq": 0, "read": 0, "error": ""}
    try:
        engine = (CHECKED if checked else ENGINES)[key](Path(directory))
        result.update(opened=True, last_seq=engine.last_seq)
        for seq in range(1, min(records, engine.last_seq) + 1):
            decode(engine.read(seq, seq)[0])
            result["read"] = seq
    except Exception as exc:  # every failure is a finding here, reported, never raised
        result["error"] = f"{type(exc).__name__}: {exc}"
    conn.send(result)


def truncated(key: str, image: Path, victim: Path, cut_to: int, records: int) -> str:
    """Cut `victim` to `cut_to` bytes, open the copy in a child process, describe the outcome."""
    size = victim.stat().st_size
    os.truncate(victim, cut_to)
    cut = f"{victim.name} {size:,} -> {cut_to:,} B: "
    text = cut + opened_in_child(key, False, image, records)
    if key in CHECKED:
        text += "; with the size check on open: " + opened_in_child(key, True, image, records)
    return text


def opened_in_child(key: str, checked: bool, image: Path, records: int) -> str:
    """What happens when a child process opens the queue at `image` and reads it back."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=probe, args=(key, checked, str(image), records, child))
    proc.start()
    child.close()
    got: dict[str, Any] | None = None
    if parent.poll(60):
        try:
            got = parent.recv()
        except EOFError:  # the child died before it could answer
            got = None
    proc.join(60)
    if proc.exitcode is not None and proc.exitcode < 0:
        return f"child killed by {signal.Signals(-proc.exitcode).name}"
    if got is None:
        return f"child gave no answer (exit code {proc.exitcode})"
    if not got["opened"]:
        return f"open fails: {got['error']}"
    text = f"opens, holds {got['last_seq']}/{records}, reads {got['read']} in order"
    return text + (f", then {got['error']}" if got["error"] else ", all crc ok")


def truncation(key: str, work: Path, groups: Sequence[Group], per_commit: int) -> dict[str, str]:
    """The torn-tail (crash image) and cut-at-half (clean close) outcomes for one engine."""
    directory = work / f"{key}-trunc"
    engine = fill(key, directory, groups, per_commit)
    copy_image(directory, work / f"{key}-tail")
    engine.close()
    copy_image(directory, work / f"{key}-half")
    tail = tail_file(key, work / f"{key}-tail")
    half = main_file(key, work / f"{key}-half")
    out = {"torn tail": truncated(key, work / f"{key}-tail", tail, tail.stat().st_size - CUT_FROM_END, len(groups)),
           "cut at half": truncated(key, work / f"{key}-half", half, half.stat().st_size // 2 + 1001, len(groups))}
    for name in ("trunc", "tail", "half"):
        shutil.rmtree(work / f"{key}-{name}")
    return out


# -- raw fsync -------------------------------------------------------------------------


def filesystem(path: Path) -> str:
    """'fstype device' of the mount holding `path` (Linux /proc/mounts; '?' elsewhere)."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?"
    real = str(path.resolve())
    best = max((m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")),
               key=lambda m: len(m[1]), default=None)
    return f"{best[2]} {best[0]}" if best else "?"


def fsync_latency(dirs: Sequence[Path], samples: int, size: int = 4096) -> dict[str, list[float]]:
    """Seconds per os.fsync after a `size`-byte append, the folders interleaved sample by sample."""
    out: dict[str, list[float]] = {str(d): [] for d in dirs}
    fds: list[tuple[str, int, str]] = []
    for folder in dirs:
        fd, name = tempfile.mkstemp(prefix="bench-fsync-", dir=folder)
        fds.append((str(folder), fd, name))
    block = b"v" * size
    try:
        for _ in range(samples):
            for d, fd, _name in fds:
                os.write(fd, block)
                t = time.perf_counter()
                os.fsync(fd)
                out[d].append(time.perf_counter() - t)
    finally:
        for _d, fd, name in fds:
            os.close(fd)
            os.unlink(name)
    return out


# -- main --------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:6.2f}"


def max_rate_rounds(keys: list[str], work: Path, sizes: Sequence[int], values: int,
                    rounds: int) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Rounds of every engine at each group size, flat out, the engine order rotated each round."""
    results: dict[int, dict[str, list[dict[str, Any]]]] = {s: {k: [] for k in keys} for s in sizes}
    for size in sizes:
        groups = make_groups(min(values, POOL_VALUES), size)
        for r in range(rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                res = run_engine(key, work, groups, values // size, MAX_RATE_INTERVAL)
                results[size][key].append(res)
                print(f"round {r + 1}: groups of {size:<5d} {key:15s} {res['rate']:>10,.0f} values/s "
                      f"({res['seconds']:.2f} s; commit p50 {ms(percentile(res['commit_s'], 50))} ms, "
                      f"engine {res['engine_rate']:>10,.0f} values/s)", flush=True)
    return results


def print_max_rate(results: dict[int, dict[str, list[dict[str, Any]]]],
                   footprints: dict[tuple[str, int], tuple[float, float]],
                   raw_per_value: dict[int, float]) -> dict[str, Any]:
    mark = {True: "ok", False: "BELOW TARGET"}
    report: dict[str, Any] = {}
    for size, by_key in results.items():
        print(f"\nmax rate, groups of {size}, fsync_interval {MAX_RATE_INTERVAL * 1000:.0f} ms "
              f"(record: {raw_per_value[size]:.1f} B/value; medians of rounds, latencies pooled)")
        print(f"  {'engine':15s} {'values/s':>10s} {'x file':>7s} {'engine v/s':>11s} {'x file':>7s} {'read v/s':>11s} "
              f"{'v/commit':>8s} {'commit p50':>10s} {'p99 ms':>7s} {'peak MB':>8s} {'B/v open':>8s} {'closed':>6s}  "
              f"target >= {TARGET_RATE:,}")
        base = statistics.median(r["rate"] for r in by_key[BASELINE])
        engine_base = statistics.median(r["engine_rate"] for r in by_key[BASELINE])
        for key, runs in by_key.items():
            rate = statistics.median(r["rate"] for r in runs)
            commits = [c for r in runs for c in r["commit_s"]]
            row = {"rate": rate, "ratio_to_file": rate / base,
                   "engine_rate": statistics.median(r["engine_rate"] for r in runs),
                   "engine_ratio_to_file": statistics.median(r["engine_rate"] for r in runs) / engine_base,
                   "read_rate": statistics.median(r["read_rate"] for r in runs),
                   "values_per_commit": statistics.median(r["per_commit"] for r in runs),
                   "commit_p50_ms": percentile(commits, 50) * 1000, "commit_p99_ms": percentile(commits, 99) * 1000,
                   "peak_mb": statistics.median(r["peak_bytes"] for r in runs) / 1e6,
                   "bytes_per_value_open": footprints[(key, size)][0],
                   "bytes_per_value_closed": footprints[(key, size)][1], "rates": [r["rate"] for r in runs]}
            report[f"{key}/{size}"] = row
            print(f"  {key:15s} {rate:>10,.0f} {row['ratio_to_file']:>7.2f} {row['engine_rate']:>11,.0f} "
                  f"{row['engine_ratio_to_file']:>7.2f} "
                  f"{row['read_rate']:>11,.0f} {row['values_per_commit']:>8,.0f} {row['commit_p50_ms']:>10.2f} "
                  f"{row['commit_p99_ms']:>7.2f} "
                  f"{row['peak_mb']:>8.1f} {row['bytes_per_value_open']:>8.1f} {row['bytes_per_value_closed']:>6.1f}  "
                  f"{mark[rate >= TARGET_RATE]}")
    return report


def ack_latency(keys: list[str], work: Path, seconds: float, rounds: int) -> dict[str, Any]:
    """Submit-to-durable latency at the target rate (groups of 100) per candidate fsync interval, pooled
    over `rounds` (the engine order rotated between runs)."""
    groups = make_groups(int(TARGET_RATE * seconds), 100)
    pace = 100 / TARGET_RATE
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {(k, i): [] for i in INTERVALS for k in keys}
    for r in range(rounds):
        for i, interval in enumerate(INTERVALS):
            shift = (r + i) % len(keys)
            for key in keys[shift:] + keys[:shift]:
                runs[(key, interval)].append(run_engine(key, work, groups, len(groups), interval, pace))
    print(f"\nacknowledgement latency at {TARGET_RATE:,} values/s (groups of 100, {seconds:g} s a run, "
          f"{rounds} rounds pooled), target p99 <= interval + {ACK_SLACK * 1000:.0f} ms")
    print(f"  {'engine':15s} {'interval':>8s} {'ack p50':>8s} {'ack p99':>8s} {'max':>7s} {'commit p50':>10s} "
          f"{'p99':>7s} {'max':>7s}  (ms)")
    report: dict[str, Any] = {}
    for (key, interval), got in runs.items():
        ack = [a for res in got for a in res["ack_s"]]
        commit = [c for res in got for c in res["commit_s"]]
        row = {"ack_p50_ms": percentile(ack, 50) * 1000, "ack_p99_ms": percentile(ack, 99) * 1000,
               "ack_max_ms": max(ack) * 1000, "commit_p50_ms": percentile(commit, 50) * 1000,
               "commit_p99_ms": percentile(commit, 99) * 1000, "commit_max_ms": max(commit) * 1000}
        row["met"] = row["ack_p99_ms"] <= (interval + ACK_SLACK) * 1000
        report[f"{key}/{interval * 1000:.0f}ms"] = row
        print(f"  {key:15s} {interval * 1000:>5.0f} ms {row['ack_p50_ms']:>8.2f} {row['ack_p99_ms']:>8.2f} "
              f"{row['ack_max_ms']:>7.2f} {row['commit_p50_ms']:>10.2f} {row['commit_p99_ms']:>7.2f} "
              f"{row['commit_max_ms']:>7.2f}  {'ok' if row['met'] else 'ABOVE TARGET'}")
    return report


def print_truncation(keys: list[str], work: Path) -> dict[str, Any]:
    print("\ntruncation: 200 records of 100 values in 20 commits; each cut copy opened and read in a child process")
    report: dict[str, Any] = {}
    for key in keys:
        report[key] = truncation(key, work, make_groups(20_000, 100), 10)
        for case, text in report[key].items():
            print(f"  {key:15s} {case:12s} {text}")
    return report


def print_long_names(keys: list[str], work: Path) -> dict[str, Any]:
    """Bytes per value with 20-char names: a group of 100 no longer fits one 4 KiB page."""
    groups = make_groups(FOOTPRINT_VALUES, 100, kinds=("pump.pv.",))
    record = len(encode(groups[0]))
    report = {k: footprint(k, work, groups, 50)[1] for k in keys}
    print(f"\nbytes/value (closed), groups of 100 with 20-char names ({record:,} B records, "
          f"over one 4 KiB page): " + ", ".join(f"{k} {v:.1f}" for k, v in report.items()))
    return report


def print_fsync(dirs: list[Path], samples: int) -> dict[str, Any]:
    lat = fsync_latency(dirs, samples)
    print(f"\nraw os.fsync after a 4 KiB append ({samples} samples each, interleaved)")
    report: dict[str, Any] = {}
    for d in dirs:
        xs = lat[str(d)]
        report[str(d)] = {"p50_ms": percentile(xs, 50) * 1000, "p99_ms": percentile(xs, 99) * 1000,
                          "max_ms": max(xs) * 1000, "fs": filesystem(d)}
        print(f"  {d!s:28s} {filesystem(d):22s} p50 {ms(percentile(xs, 50))} ms  p99 {ms(percentile(xs, 99))} ms"
              f"  max {ms(max(xs))} ms")
    return report


def main(argv: list[str] | None = None) -> int:
    project = Path(__file__).resolve().parents[3]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--values", type=int, default=2_000_000, help="values per max-rate run (default 2,000,000)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per group size (default 3)")
    ap.add_argument("--ack-seconds", type=float, default=1.5, help="seconds per acknowledgement-latency run")
    ap.add_argument("--ack-rounds", type=int, default=2, help="acknowledgement rounds, pooled (default 2)")
    ap.add_argument("--quick", action="store_true", help="~15 s: fewer values, rounds and seconds")
    ap.add_argument("--dir", type=Path, default=project,
                    help=f"folder for the queues, on the disk the queue will use (default {project})")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-' = stdout)")
    args = ap.parse_args(argv)
    if args.quick:
        args.values, args.rounds, args.ack_seconds, args.ack_rounds = 500_000, 2, 0.6, 1

    keys = list(ENGINES)
    if LMDB_MISSING:
        print(LMDB_MISSING)
        keys.remove("lmdb")
    sizes = (100, 1000)
    t_start = time.perf_counter()
    print(f"queues in {args.dir} ({filesystem(args.dir)}); sqlite {sqlite3.sqlite_version}"
          + ("" if LMDB_MISSING else f", lmdb {'.'.join(map(str, lmdb.version()))} (py-lmdb {lmdb.__version__})"))
    with tempfile.TemporaryDirectory(prefix="bench-queue-", dir=args.dir) as tmp:
        work = Path(tmp)
        results = max_rate_rounds(keys, work, sizes, args.values, args.rounds)
        footprints = {(k, s): footprint(k, work, make_groups(FOOTPRINT_VALUES, s), 5000 // s)
                      for k in keys for s in sizes}
        raw = {s: len(encode(make_groups(s, s)[0])) / s for s in sizes}
        report: dict[str, Any] = {"max_rate": print_max_rate(results, footprints, raw)}
        report["long_names_bytes_per_value"] = print_long_names(keys, work)
        report["ack_latency"] = ack_latency(keys, work, args.ack_seconds, args.ack_rounds)
        report["truncation"] = print_truncation(keys, work)
    dirs = [d for d in (args.dir, Path(tempfile.gettempdir()), Path("/dev/shm")) if d.is_dir()]
    report["fsync"] = print_fsync(dirs, 100 if args.quick else 300)
    print(f"\nbench_queue_engines: {time.perf_counter() - t_start:.0f} s")
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
