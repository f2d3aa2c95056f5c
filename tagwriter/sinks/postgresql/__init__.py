"""PostgreSQL through psycopg 3: one statement per batch, in autocommit, rows sent in binary.

A batch is one statement, atomic on its own, so the session runs in
autocommit: no BEGIN and COMMIT round trips. While no duplicates are seen,
it is a binary COPY straight into the table (the cheapest insert PostgreSQL
has; it needs the table's own column types, read at open()). A unique
violation puts the sink in conflict mode: that batch and the next ones, until
CONFLICT_MODE_BATCHES in a row come without a duplicate, go as one
`INSERT ... SELECT FROM unnest(text[], timestamptz[], float8[], int2[])` of
binary array parameters that skips the rows already there (an index probe
per row), redone `ON CONFLICT (tag, ts) DO NOTHING` if a concurrent writer or
the batch itself holds a key twice. One round trip and no staging table: a
replay after an outage, with a few duplicates in nearly every batch, does not
pay for a failed COPY each time. Duplicates are `rows - rowcount`, and open()
refuses a table of another shape, one without a unique key on (tag, ts) among
them (`tagwriter.checks.verify_table`), so no duplicate is ever stored.

Rows are built column by column from the `tagwriter.models.Chunk` the writer
hands over (a list of TagValue is made one): checked by C-level scans of each
column (a row that needs a closer look is refused or fixed row by row:
`rows`), then encoded once per column into binary COPY data or arrays
(`binary`): a tag's bytes are cached, a timestamp's and a quality's made once
per distinct value in the batch, microseconds since 2000-01-01 straight from
the epoch microseconds (exact, no `datetime` per row). A quality outside the
column's range is refused before sending (binary COPY would wrap it).

A row the database rejects (class 22 data errors, class 23 constraint
violations) is isolated by bisection under savepoints, in one transaction,
and reported as a `RowError`; the rest of the batch commits.

The key is PRIMARY KEY (tag_name, ts) (DESIGN.md): one tag over a time range is
an index range scan.

Nothing hangs: libpq's connect_timeout bounds connecting (libpq's minimum is 2 s);
every session sets statement_timeout (90% of call_timeout) and
idle_in_transaction_session_timeout;
TCP keepalives and tcp_user_timeout cover dead peers; and a watchdog thread
shuts the socket down when a call overruns `call_timeout`, because a server
that accepted the connection and stopped answering never enforces its own
statement_timeout.

Modules: `sink` (`PostgresSink`), `errors` (SQLSTATE classification and
hints), `watchdog` (`Watchdog`), `rows` (the checks before sending),
`binary` (`Encoder`: COPY data and arrays).
"""

from __future__ import annotations

from tagwriter.sinks.postgresql.errors import classify, is_row_error
from tagwriter.sinks.postgresql.rows import PG_EPOCH_US
from tagwriter.sinks.postgresql.sink import CONFLICT_MODE_BATCHES, PostgresSink, quote_ident
from tagwriter.sinks.postgresql.watchdog import Watchdog

__all__ = ["CONFLICT_MODE_BATCHES", "PG_EPOCH_US", "PostgresSink", "Watchdog", "classify", "is_row_error",
           "quote_ident"]
