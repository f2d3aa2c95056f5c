"""Embed tagwriter in an existing polling loop: hand each poll over through a queue.Queue.

Your loop keeps its own timing and driver; `QueueConsumer(q).start(pipeline)`
starts a thread that submits every `PollingData` put on `q`. Putting on the queue never
waits on the database: the pipeline buffers, batches, retries, and spools to
backup files while the database is away.

    python examples/embed.py --polls 20 --interval 0.1 --database sqlite:///embed.db

Exit status: 0 when every value was written (or spooled), 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import queue
import sys
import time

from tagwriter import Pipeline, PollingData, load_config
from tagwriter.sources.upstream import QueueConsumer

TAGS = [f"line1.motor{i}.{what}" for i in range(1, 6) for what in ("speed", "current", "temp")]


def read_plc(cycle: int) -> dict[str, float | None]:
    """Stands in for your driver call (OPC UA read, Modbus poll, ...)."""
    return {tag: 50.0 + 10.0 * math.sin(cycle / 10.0 + i) for i, tag in enumerate(TAGS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=20, help="polls to make (default 20)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between polls (default 0.1)")
    parser.add_argument("--database", default="sqlite:///embed.db", help="database URL (no password)")
    args = parser.parse_args(argv)

    # ./tagwriter.toml and TAGWRITER_* apply as for the CLI; the overrides win.
    config = load_config(overrides={"database.url": args.database, "writer.flush_interval": 0.2})
    polls: queue.Queue[PollingData | None] = queue.Queue(maxsize=1000)

    with Pipeline(config) as pipeline:
        QueueConsumer(polls).start(pipeline)  # pipeline.stop() stops it first
        next_poll = time.monotonic()
        for cycle in range(args.polls):
            # The timestamp is the time of the poll, in UTC (epoch seconds or a datetime).
            polls.put(PollingData("line1", time.time(), read_plc(cycle)))
            next_poll += args.interval
            time.sleep(max(0.0, next_poll - time.monotonic()))
        polls.put(None)  # no more polls: the consumer thread ends after this
        ok = pipeline.stop()  # flush within writer.shutdown_timeout, spool the rest

    s = pipeline.snapshot()
    print(f"submitted {s.submitted} = written {s.written} + duplicates {s.duplicates} + "
          f"spooled {s.spooled} + quarantined {s.quarantined} + dropped {s.dropped} + pending {s.pending}")
    return 0 if ok and s.submitted == s.accounted else 1


if __name__ == "__main__":
    sys.exit(main())
