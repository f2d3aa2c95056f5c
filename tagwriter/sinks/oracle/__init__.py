"""Oracle Database through python-oracledb (thin mode by default, thick optional).

Inserts are `executemany(..., batcherrors=True)` with the bind types set
(`DB_TYPE_TIMESTAMP` keeps microseconds, `DB_TYPE_BINARY_DOUBLE` keeps NaN),
timestamps bound as naive UTC, then an explicit commit. Per-row errors come
back from `getbatcherrors()`: ORA-00001 is a duplicate (already written), any
other row error is a rejected row for quarantine. Whole-call errors are
classified by `full_code` (never `isrecoverable`, which is False for connect
failures) into TransientError or FatalError with a hint for the operator.

Connections come from `ConnectionPool`, a small bounded pool of our own, not
`oracledb.create_pool`: measured with 26.1 against a listener that accepts and
never answers, the driver pool's background thread wedges for good (every
acquire times out with DPY-4005 even after the listener is gone), `close()`
never returns, and since that thread is not a daemon the process can never
exit. Our pool opens each connection with `oracledb.connect` on the sink's one
long-lived worker thread (`CallWorker`), waited for at most `connect_timeout`
(the driver's connect has no overall timeout: `tcp_connect_timeout` only
covers the TCP handshake); a connect that overruns is left to finish, its
thread abandoned and replaced. The pool waits at most `pool_wait_timeout` for
a free connection (DPY-4005, as the driver's TIMEDWAIT pool does), sets
`call_timeout` on every acquired connection, and pings a connection that sat
idle longer than `ping_interval` before reuse (the driver's default of 60 s).
At most `pool_max` connects can be in flight, so a silent listener costs at
most that many parked threads, which end when the peer closes. Everything
else runs on the caller's thread, each round trip bounded by the driver's
`call_timeout`: `write_batch` on a pooled connection starts no thread and
hands nothing to another one (issue 17: a thread per call, which must win the
GIL from a busy producer, held the sink to 0.4 of a do-nothing one). So
nothing here can hang the writer, `stop()` or a command.

`insert_mode = "direct_path"` uses `Connection.direct_path_load` (thin mode
only; rows are committed by the load; no per-row errors). Duplicates are
taken out first (within the batch, and against keys already in the table for
the batch's time range) and counted as duplicates; if the load still fails on
data, the batch is written again the conventional way so that row errors are
reported per row. See README "Oracle" for when it helps and its limits.

Modules: `errors` (codes, classification, hints), `pool` (the bounded
`ConnectionPool`), `worker` (`CallWorker`, the thread for connects), `sink`
(`OracleSink`), `schema` (the data dictionary and the type rules), `binds`
(bind rows, datetimes in and out).
"""

from __future__ import annotations

from tagwriter.sinks.oracle.binds import bind_rows, naive_utc, to_us
from tagwriter.sinks.oracle.errors import classify, error_code, error_text, hint_for
from tagwriter.sinks.oracle.pool import ConnectionPool
from tagwriter.sinks.oracle.sink import OracleSink
from tagwriter.sinks.oracle.worker import CallWorker

__all__ = ["CallWorker", "ConnectionPool", "OracleSink", "bind_rows", "classify", "error_code", "error_text",
           "hint_for", "naive_utc", "to_us"]
