"""PostgreSQL through psycopg 3: binary COPY into a staging table, then one INSERT ... SELECT.

A batch is one transaction: binary `COPY` into a session-local temporary table
(`ON COMMIT DELETE ROWS`), then `INSERT INTO t SELECT ... FROM stage`, commit.
While no duplicates are seen, a batch is COPied straight into the table
instead (no staging table, no INSERT: about 1.3x faster again); that needs the
table's own column types for the binary format, read at open(). A unique
violation rolls back and the batch is redone through the staging table with
`ON CONFLICT (tag, ts) DO NOTHING`, which then stays on for a while (replays
bring many duplicates); any other error of the direct COPY (a data error, a
quality outside a smallint column: checked before sending, since binary COPY
would wrap it) sends the batch the staging way, which isolates bad rows. Either way duplicates are
`rows - rowcount`, and open() refuses a table of another shape, one without a
unique key on (tag, ts) among them (`tagwriter.checks.verify_table`), so the
plain INSERT can never store a duplicate.

A row the database rejects (class 22 data errors, class 23 constraint
violations) is isolated by bisection under savepoints and reported as a
`RowError`; the rest of the batch commits.

The key is PRIMARY KEY (tag_name, ts) (DESIGN.md): one tag over a time range is
an index range scan. `ts` is timestamptz, sent in COPY as its binary form (int8
microseconds since 2000-01-01 UTC) straight from `TagValue.ts_us`: exact to the
microsecond and no `datetime` built per row.

Nothing hangs: libpq's connect_timeout bounds connecting (libpq's minimum is 2 s);
every session sets statement_timeout (90% of call_timeout) and
idle_in_transaction_session_timeout;
TCP keepalives and tcp_user_timeout cover dead peers; and a watchdog thread
shuts the socket down when a call overruns `call_timeout`, because a server
that accepted the connection and stopped answering never enforces its own
statement_timeout.

Modules: `sink` (`PostgresSink`), `errors` (SQLSTATE classification and
hints), `watchdog` (`Watchdog`), `rows` (rows as binary COPY sends them).
"""

from __future__ import annotations

from tagwriter.sinks.postgresql.errors import classify, is_row_error
from tagwriter.sinks.postgresql.rows import PG_EPOCH_US
from tagwriter.sinks.postgresql.sink import CONFLICT_MODE_BATCHES, PostgresSink, quote_ident
from tagwriter.sinks.postgresql.watchdog import Watchdog

__all__ = ["CONFLICT_MODE_BATCHES", "PG_EPOCH_US", "PostgresSink", "Watchdog", "classify", "is_row_error",
           "quote_ident"]
