"""Property: whatever the database does, every submitted value is accounted for exactly once.

Hypothesis draws a pipeline config (capacity, batch size, overflow policy,
retries, auto replay) and a script of submissions and faults (fail N writes
with a transient or fatal error, down until told, reject rows by a predicate,
rows a real SQLite CHECK constraint rejects, block briefly, flush, resubmit an
earlier group). After `stop()`:

    submitted == written + duplicates + spooled + quarantined + dropped, pending == 0

and the files agree with the counters: rows in the table == written (+ rows
the automatic spool drain inserted), rows in spool files == spooled, rows in
quarantine files == quarantined (+ rows the drain quarantined).
"""

from __future__ import annotations

import functools
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig, WriterConfig, validate
from tagwriter.errors import FatalError, SinkError, TransientError
from tagwriter.models import PollingData, TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.spoolformat import SpoolLine, read_spool

CHECKED_TABLE = (
    "CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts TEXT NOT NULL, "
    "value REAL CHECK (value IS NULL OR value < 1e6), quality INTEGER, "
    "PRIMARY KEY (ts, tag_name)) WITHOUT ROWID"
)
TOO_BIG = 1e9  # the CHECK constraint rejects it: a real row error from SQLite

configs = st.fixed_dictionaries({
    "capacity": st.sampled_from([20, 60, 1000]),
    "batch_size": st.integers(1, 40),
    "policy": st.sampled_from(["drop-oldest", "spill", "block"]),
    "retries": st.integers(0, 3),
    "flush_interval": st.sampled_from([0.005, 0.05]),
    "auto_replay": st.booleans(),
})

ops = st.one_of(
    st.tuples(st.just("submit"), st.integers(1, 6), st.integers(1, 30), st.booleans()),
    st.tuples(st.just("resubmit"), st.integers(0, 10_000)),
    st.tuples(st.just("fail"), st.integers(1, 6), st.booleans()),
    st.tuples(st.just("down")),
    st.tuples(st.just("up")),
    st.tuples(st.just("reject"), st.integers(2, 9)),
    st.tuples(st.just("reject_off")),
    st.tuples(st.just("block"), st.sampled_from([0.005, 0.02, 0.05])),
    st.tuples(st.just("flush")),
)


def make_config(tmp: Path, c: dict[str, Any]) -> Config:
    config = Config(
        buffer=BufferConfig(capacity=c["capacity"], overflow_policy=c["policy"], block_timeout=0.01),
        writer=WriterConfig(
            batch_size=min(c["batch_size"], c["capacity"]), flush_interval=c["flush_interval"],
            retry_delays=[0.002] * c["retries"], probe_interval=0.01, probe_max_interval=0.02,
        ),
        database=DatabaseConfig(url=f"sqlite:///{tmp / 'tags.db'}"),
        backup=BackupConfig(directory=str(tmp / "backup"), quarantine_directory=str(tmp / "backup" / "quarantine"),
                            auto_replay=c["auto_replay"], replay_rate=0.0),
    )
    validate(config)
    return config


def multiple_of(m: int, row: TagValue) -> bool:
    return row.value is not None and int(row.value) % m == 0


def file_rows(directory: Path, pattern: str, *, quarantine: bool = False) -> int:
    n = 0
    for path in directory.glob(pattern):
        for item in read_spool(path, quarantine=quarantine):
            assert isinstance(item, SpoolLine), item
            n += 1
    return n


def run_script(tmp: Path, c: dict[str, Any], script: list[tuple[Any, ...]]) -> None:
    db = tmp / "tags.db"
    with sqlite3.connect(db) as conn:
        conn.execute(CHECKED_TABLE)
    sink = MemorySink(inner=SqliteSink(db))
    p = Pipeline(make_config(tmp, c), sink=sink).start()
    sent: list[PollingData] = []
    timers: list[threading.Timer] = []
    seq = submitted = 0
    try:
        for op in script:
            kind = op[0]
            if kind == "submit":
                _, count, size, bad = op
                for _ in range(count):
                    values: dict[str, float | None] = {f"t{seq + i}": float(seq + i) for i in range(size)}
                    if bad:
                        values[f"t{seq}"] = TOO_BIG
                    pd = PollingData(f"g{len(sent)}", 1_700_000_000 + len(sent) * 0.001, values)
                    sent.append(pd)
                    seq += size
                    p.submit(pd)
                    submitted += len(pd)
            elif kind == "resubmit" and sent:
                again = sent[op[1] % len(sent)]
                p.submit(again)  # same keys: duplicates if already written
                submitted += len(again)
            elif kind == "fail":
                error: type[SinkError] = FatalError if op[2] else TransientError
                sink.fail_times(op[1], functools.partial(error, "injected", code="TEST-INJECTED"))
            elif kind == "down":
                sink.go_down()
            elif kind == "up":
                sink.come_up()
            elif kind == "reject":
                sink.reject_if(functools.partial(multiple_of, op[1]))
            elif kind == "reject_off":
                sink.reject_if(None)
            elif kind == "block":
                sink.block()
                timer = threading.Timer(op[1], sink.release)
                timers.append(timer)
                timer.start()
            elif kind == "flush":
                p.flush(1.0)
        for timer in timers:  # every block is brief: none is still held when stop() runs
            timer.join(5.0)
        assert p.stop(10.0) is True
    finally:
        sink.release()
        p.stop(1.0)

    snap = p.snapshot()
    settled = snap.written + snap.duplicates + snap.spooled + snap.quarantined + snap.dropped
    assert snap.pending == 0
    assert snap.submitted == settled == submitted
    with sqlite3.connect(db) as conn:
        (in_table,) = conn.execute("SELECT count(*) FROM tag_values").fetchone()
    assert in_table == snap.written + snap.extra["replayed"]
    backup = tmp / "backup"
    assert file_rows(backup, "tagwriter-*.csv") + file_rows(backup / "replayed", "tagwriter-*.csv") == snap.spooled
    quarantined = file_rows(backup / "quarantine", "quarantine-*.csv", quarantine=True)
    assert quarantined == snap.quarantined + snap.extra["replay_quarantined"]
    assert snap.dropped == sum(snap.dropped_by_reason.values())
    if c["policy"] == "spill":
        assert snap.dropped == 0  # spill never loses a value while the spool can take it


@settings(max_examples=25, deadline=None)
@given(config=configs, script=st.lists(ops, min_size=1, max_size=12))
def test_counter_identity_holds_under_random_faults(config: dict[str, Any], script: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_script(Path(tmp), config, script)
