"""Stateful property test of the durable queue (`DiskQueue`, real SQLite files) against a simple model.

Hypothesis drives one queue through submit / commit / drain+write / fail /
crash / restart and compares it after every step with a model that knows only
the queue's promises:

- a value whose receipt settled (acknowledged) is, across restarts and
  crashes, released (written or spooled) or still queued: never lost;
- delivery is FIFO, in the positions submit gave, with the rows as submitted;
- after a clean shutdown and restart exactly the unreleased values come back
  (`recovered`), nothing released is delivered again, the last cursor resumes;
- after a crash (kill -9) the values delivered again are only those whose
  release had not been committed: a release is committed by the next group
  commit at the latest, so any value released before a submit whose commit
  survived is not delivered again; spooled values are forgotten only after
  `before_release` (the spool's fsync) ran.

A crash is modelled exactly: with the queue's write lock held by a second
connection (no transaction can be half way), queue.db, -wal and -shm are
copied as they are into a new folder, which is all a kill -9 leaves; the old
queue is stopped without a final commit and its folder never used again.
What the commit thread had not committed at that moment may or may not be in
the copy: the model accepts any whole-submit prefix that holds every
acknowledged value, and learns which one from the reopened queue.

The folders are on /dev/shm where it exists: fsync there is a no-op, so a
run's fsyncs (~900 group commits, ~4,000 queues opened and closed, each close a
checkpoint) cost nothing, where on a slow disk each takes milliseconds. That is
sound for what this test checks (the queue's logic: what it commits, releases and recovers);
the disk's side (fsync, torn writes) is the kill -9 loop's and the
torn-storage tests'. A run takes 20-45 s (256 examples of up to 64 steps), hence
`slow`. The thread timing decides what a crash catches, so a failure may not
replay exactly (hypothesis then says "flaky"): the steps it prints still show it.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tagwriter.buffer import Batch
from tagwriter.diskqueue import QUEUE_FILE, DiskQueue
from tagwriter.models import TagValue
from tagwriter.settle import Receipt

SHM = Path("/dev/shm")
WAIT = 10.0  # seconds a commit or a shutdown may take before the test calls it stuck
CURSOR_KEYS = ("a", "b")  # two sources, so that a cursor is kept per key
T0_US = 1_700_000_000_000_000


@dataclass(frozen=True, slots=True)
class Submit:
    """One `put_many` as the model remembers it."""

    start: int  # position of its first row
    end: int  # position after its last row (== start for a cursor-only submit)
    cursor: tuple[str, str] | None
    released_at: int  # the release watermark when it was made: the commit that takes it persists at least this


def row(n: int) -> TagValue:
    """The n-th value submitted: a unique tag (the key), some None values, several qualities."""
    return TagValue(f"k{n}", T0_US + n, None if n % 7 == 0 else n * 0.25, (0, 64, 192)[n % 3])


def last_cursor(submits: list[Submit], key: str) -> str | None:
    found = None
    for s in submits:
        if s.cursor is not None and s.cursor[0] == key:
            found = s.cursor[1]
    return found


class QueueModel(RuleBasedStateMachine):
    """One queue folder's life: a `DiskQueue` and the model it must agree with."""

    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="queue-model-", dir=SHM if SHM.is_dir() else None))
        self.generation = 0
        self.q: DiskQueue | None = None
        self.capacity = 100_000
        self.fsync_interval = 0.001
        self.rows: dict[int, TagValue] = {}  # position -> row, of what the queue may still hold
        self.submits: list[Submit] = []
        self.committed_submits = 0  # submits known to be committed (after a restart or a crash)
        self.receipts: list[Receipt] = []
        self.tail = 0  # position the next row gets
        self.ack_end = 0  # every position below has settled (acknowledged)
        self.delivered = 0  # the next position the writer must be handed
        self.released = 0  # every position below has been released (in order: one batch at a time)
        self.floor = 0  # every position below is known to be released durably
        self.writer_dead = False  # the writer died holding a batch: nothing releases it, nothing is taken after it
        self.counter = 0
        self.released_keys: set[str] = set()
        self.ever_acked: set[str] = set()
        self.spooled: dict[int, str] = {}  # position -> key, spooled in this queue's life
        self.spool_log: list[str] = []  # keys spooled, in order
        self.synced = 0  # spool_log[:synced] were spooled before a `before_release` (the spool's fsync)

    # -- the queue's life ----------------------------------------------------

    @initialize(capacity=st.sampled_from([1, 7, 64, 100_000]), fsync_interval=st.sampled_from([0.0, 0.001]))
    def open_first(self, capacity: int, fsync_interval: float) -> None:
        self.capacity, self.fsync_interval = capacity, fsync_interval
        self.q = self._open(self._new_directory())
        assert self.q.recovered == 0 and self.q.tail == 0

    def _new_directory(self) -> Path:
        self.generation += 1
        return self.base / f"queue-{self.generation}"

    def _open(self, directory: Path) -> DiskQueue:
        q = DiskQueue(directory, capacity=self.capacity, fsync_interval=self.fsync_interval)
        q.before_release = lambda: self._spool_synced(q)
        q.start()
        return q

    def _spool_synced(self, q: DiskQueue) -> None:
        """The spool's fsync, as the pipeline wires it: whatever was spooled so far is on disk now."""
        if q is self.q:  # (a queue abandoned by a crash no longer counts)
            self.synced = len(self.spool_log)

    @property
    def queue(self) -> DiskQueue:
        assert self.q is not None
        return self.q

    def teardown(self) -> None:
        if self.q is not None:
            self.q.shutdown(WAIT)
        shutil.rmtree(self.base, ignore_errors=True)

    # -- producers -------------------------------------------------------------

    @rule(n=st.integers(1, 50))
    def submit(self, n: int) -> None:
        self._put(self._rows(n), None)

    @rule(n=st.integers(1, 50), cursor=st.sampled_from(CURSOR_KEYS))
    def submit_with_cursor(self, n: int, cursor: str) -> None:
        """A source's submit: the rows and its position, in one transaction."""
        self._put(self._rows(n), cursor)

    @rule(cursor=st.sampled_from(CURSOR_KEYS))
    def advance_cursor(self, cursor: str) -> None:
        """An empty submit that only moves a source's resume position (allowed by the API)."""
        self._put([], cursor)

    def _rows(self, n: int) -> list[TagValue]:
        self.counter += n
        return [row(i) for i in range(self.counter - n, self.counter)]

    def _put(self, rows: list[TagValue], cursor: str | None) -> None:
        position = (cursor, str(len(self.submits))) if cursor is not None else None
        result = self.queue.put_many(rows, cursor=position)
        assert result.accepted == len(rows) and not result.dropped and not result.evicted and not result.refused
        assert result.end == self.tail + len(rows)
        for i, r in enumerate(rows):
            self.rows[self.tail + i] = r
        self.submits.append(Submit(self.tail, result.end, position, self.released))
        self.tail = result.end
        if rows:
            self.receipts.append(Receipt(True, self.queue.settlement, result.end))  # as Pipeline.submit makes it

    @precondition(lambda self: self.receipts)
    @rule(which=st.integers(0, 2**16))
    def commit(self, which: int) -> None:
        """Wait for a receipt (the last one, or an earlier one) to settle: its group commit is fsynced."""
        receipt = self.receipts[-1 - which % len(self.receipts)]
        assert receipt.wait(WAIT), "a receipt did not settle"
        assert receipt.settled

    # -- the writer --------------------------------------------------------------

    @precondition(lambda self: not self.writer_dead)
    @rule(batch_size=st.integers(1, 80))
    def drain_and_write(self, batch_size: int) -> None:
        self._release(self._take(batch_size), spooled=False)

    @precondition(lambda self: not self.writer_dead)
    @rule(batch_size=st.integers(1, 80), crashed=st.booleans())
    def fail(self, batch_size: int, crashed: bool) -> None:
        """The write fails: the batch is spooled (settled elsewhere), or the writer dies holding it."""
        batch = self._take(batch_size)
        if crashed:
            self.writer_dead = True  # even if it took nothing: which rules may run must not depend on timing
        else:
            self._release(batch, spooled=True)

    @precondition(lambda self: not self.writer_dead)
    @rule()
    def drain_everything(self) -> None:
        """Wait for every commit and write all that is queued: then every value ever acknowledged is released."""
        if self.receipts:
            assert self.receipts[-1].wait(WAIT)
        self._observe_acknowledged()
        while self.delivered < self.tail:
            batch = self._take(self.tail)
            assert batch.rows, f"{self.tail - self.delivered} values queued and durable, none delivered"
            self._release(batch, spooled=False)
        missing = self.ever_acked - self.released_keys
        assert not missing, f"acknowledged and never delivered: {sorted(missing)[:10]}"

    def _take(self, batch_size: int) -> Batch:
        """As the writer does: wait_ready, then drain; checks FIFO order and the rows against the model."""
        q = self.queue
        self._observe_acknowledged()
        ready = q.wait_ready(batch_size, 0.0, 0.0)
        assert max(0, self.ack_end - self.delivered) <= ready <= self.tail - self.delivered
        batch = q.drain(batch_size)
        assert len(batch.rows) <= batch_size
        if self.ack_end > self.delivered:
            assert batch.rows, "durable values were waiting and the drain handed none"
        if batch.rows:
            assert batch.start == self.delivered, f"batch at {batch.start}, expected {self.delivered}"
            assert batch.end <= self.tail
            assert batch.rows == [self.rows[p] for p in range(batch.start, batch.end)]
            assert sum(count for _t, count in batch.marks) == len(batch.rows)
        self.delivered = batch.end if batch.rows else self.delivered
        return batch

    def _release(self, batch: Batch, *, spooled: bool) -> None:
        if not batch.rows:
            return
        keys = [r.tag for r in batch.rows]
        if spooled:  # recorded before the release, as the spool is written before the writer releases
            self.spool_log.extend(keys)
            self.spooled.update(zip(range(batch.start, batch.end), keys, strict=True))
        self.released_keys.update(keys)
        self.queue.release(batch.start, batch.end)
        self.released = batch.end

    # -- restarts ----------------------------------------------------------------

    @rule()
    def restart(self) -> None:
        """Clean shutdown (the last group commit persists every submit and release), then reopen the folder."""
        q = self.queue
        directory = q.directory
        assert q.shutdown(WAIT) == [], "a clean shutdown left rows it could not make durable"
        assert not self._unsynced(self.spooled), "a spooled batch was released before the spool was synced"
        self.q = None
        self.q = self._open(directory)
        self._reopened(durable_end=self.tail, release=self.released, submits=len(self.submits))

    @rule()
    def crash(self) -> None:
        """kill -9: copy the files as they are between two transactions; go on with the copy."""
        old = self.queue
        self._observe_acknowledged()
        directory = self._new_directory()
        directory.mkdir()
        lock = sqlite3.connect(old.directory / QUEUE_FILE, timeout=WAIT, isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")  # waits for a commit under way; then no other can start
            acked = old.settlement.mark  # what a caller may have seen settled at the kill
            for suffix in ("", "-wal", "-shm"):
                source = old.directory / (QUEUE_FILE + suffix)
                if source.exists():
                    shutil.copyfile(source, directory / source.name)
        finally:
            old._commit = lambda: False  # the killed process writes nothing more
            old.before_release = None
            lock.execute("ROLLBACK")
            lock.close()
        old.shutdown(WAIT)
        self._acknowledge(acked)
        self.q = None
        self.q = self._open(directory)
        self._recovered_after_crash()

    def _recovered_after_crash(self) -> None:
        """Learn which prefix survived, check it against what was acknowledged and released, adopt it."""
        q = self.queue
        durable_end, recovered = q.tail, q.recovered
        release = durable_end - recovered
        assert self.ack_end <= durable_end <= self.tail, (
            f"recovered up to {durable_end}: acknowledged up to {self.ack_end}, submitted up to {self.tail}")
        ends = [0] + [s.end for s in self.submits]
        assert durable_end in ends, f"recovered up to {durable_end}, not the end of a submit"
        surviving = [s for s in self.submits if s.end <= durable_end and s.end > s.start]
        floor = max([self.floor] + [s.released_at for s in surviving])
        assert floor <= release <= self.released, (
            f"delivered again from {release}: released up to {self.released}, committed up to {floor}")
        assert not self._unsynced({p: key for p, key in self.spooled.items() if p < release}), (
            "a release of spooled values was committed before the spool was synced")
        self._reopened(durable_end=durable_end, release=release, submits=self._surviving_submits(durable_end))

    def _unsynced(self, spooled: dict[int, str]) -> set[str]:
        """Keys among `spooled` (released as spooled) that no `before_release` covered."""
        return set(spooled.values()) - set(self.spool_log[:self.synced])

    def _surviving_submits(self, durable_end: int) -> int:
        """How many submits survived a crash: the rows say up to `durable_end`; the cursors say which
        cursor-only submits after it did (the last committed cursor per key is what `resume_point` shows)."""
        fits = [j for j in range(len(self.submits) + 1)
                if (self.submits[j - 1].end if j else 0) == durable_end and j >= self.committed_submits]
        seen = {key: self.queue.resume_point(key) for key in CURSOR_KEYS}
        matching = [j for j in fits if all(last_cursor(self.submits[:j], k) == seen[k] for k in CURSOR_KEYS)]
        assert matching, f"resume points {seen} are not the last cursors of any surviving prefix"
        return max(matching)

    def _reopened(self, *, durable_end: int, release: int, submits: int) -> None:
        """The queue was reopened holding positions `release` .. `durable_end - 1`: check it, reset the model."""
        self._acknowledge(durable_end)  # durable in the folder: the new queue settles them at once
        q = self.queue
        assert q.tail == durable_end and q.settlement.mark == durable_end
        assert q.recovered == durable_end - release, f"recovered {q.recovered}, expected {durable_end - release}"
        assert len(q) == q.recovered == q.stats().values
        assert q.torn_tails == 0 and q.corrupt == 0
        del self.submits[submits:]
        for key in CURSOR_KEYS:
            assert q.resume_point(key) == last_cursor(self.submits, key), f"resume point of {key!r}"
        for p in [p for p in self.rows if p < release or p >= durable_end]:
            del self.rows[p]
        self.committed_submits = len(self.submits)
        self.receipts.clear()
        self.tail = self.ack_end = durable_end
        self.delivered = self.released = self.floor = release
        self.writer_dead = False
        self.spooled.clear()

    # -- what every step must keep -------------------------------------------------

    def _observe_acknowledged(self) -> None:
        self._acknowledge(self.queue.settlement.mark)

    def _acknowledge(self, mark: int) -> None:
        assert mark <= self.tail, f"settled up to {mark}, beyond what was submitted ({self.tail})"
        for p in range(self.ack_end, mark):
            self.ever_acked.add(self.rows[p].tag)
        self.ack_end = max(self.ack_end, mark)

    @invariant()
    def settled_values_are_released_or_queued(self) -> None:
        if self.q is None:
            return
        self._observe_acknowledged()
        queued = {self.rows[p].tag for p in range(self.released, self.tail)}
        lost = self.ever_acked - self.released_keys - queued
        assert not lost, f"acknowledged values neither released nor queued: {sorted(lost)[:10]}"

    @invariant()
    def resume_point_is_a_committed_cursor(self) -> None:
        """The last committed cursor: at or after the one of the last acknowledged submit, never beyond the last."""
        if self.q is None:
            return
        acked = max([self.committed_submits] + [j + 1 for j, s in enumerate(self.submits)
                                                if s.end > s.start and s.end <= self.ack_end])
        for key in CURSOR_KEYS:
            candidates = {last_cursor(self.submits[:j], key) for j in range(acked, len(self.submits) + 1)}
            assert self.queue.resume_point(key) in candidates, f"resume point of {key!r}"


TestQueueModel = pytest.mark.slow(QueueModel.TestCase)
TestQueueModel.settings = settings(max_examples=256, stateful_step_count=64, deadline=None)
