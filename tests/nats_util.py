"""The real nats-server (JetStream) for tests: an operator's client, throwaway streams, a stream read back whole.

`needs_nats` skips a test (with the reason) when nothing answers on 127.0.0.1:4222.
`Broker` is a nats-py client on its own thread and loop, as an operator's tool
would look at the server; `temp_stream` makes a stream with a unique name and
deletes it afterwards; `Broker.messages` reads every message a stream holds
(by sequence, so it works on work-queue streams, where a second consumer may not).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from tagwriter.models import TagValue
from tagwriter.sources.jetstream import decode_message

nats = pytest.importorskip("nats", reason="the nats extra (nats-py) is not installed")
from nats.js import api  # noqa: E402

NATS = ("127.0.0.1", 4222)
NATS_URL = "nats://127.0.0.1:4222"
T = TypeVar("T")


def nats_answers(address: tuple[str, int] = NATS) -> bool:
    try:
        with socket.create_connection(address, timeout=1.0):
            return True
    except OSError:
        return False


needs_nats = pytest.mark.skipif(not nats_answers(), reason="no nats-server on 127.0.0.1:4222")


class Broker:
    """A nats-py client on its own thread and loop: make and delete streams, read them back, look at consumers."""

    def __init__(self, url: str | list[str] = NATS_URL, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-broker", daemon=True)
        self._thread.start()
        self.nc = self.call(nats.connect(url, **options))
        self.js = self.nc.jetstream(timeout=10)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.nc.close(), 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def add_stream(self, name: str, **config: Any) -> None:
        config.setdefault("subjects", [f"{name}.>"])
        self.call(self.js.add_stream(api.StreamConfig(name=name, **config)))

    def delete_stream(self, name: str) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            self.call(self.js.delete_stream(name))

    def info(self, name: str) -> api.StreamInfo:
        return self.call(self.js.stream_info(name))

    def consumer(self, stream: str, durable: str) -> api.ConsumerInfo:
        return self.call(self.js.consumer_info(stream, durable))

    def messages(self, name: str) -> list[Any]:
        """Every message the stream holds now (RawStreamMsg: subject, data, headers, seq), in order."""
        state = self.info(name).state

        async def read() -> list[Any]:
            out = []
            for seq in range(state.first_seq, state.last_seq + 1):
                with contextlib.suppress(nats.js.errors.NotFoundError):  # deleted (acked in a work queue)
                    out.append(await self.js.get_msg(name, seq))
            return out
        return self.call(read(), 120)

    def rows(self, name: str) -> list[TagValue]:
        """Every row of every message of the stream, decoded as a writer decodes them."""
        return [row for msg in self.messages(name) for row in decode_message(msg.data, msg.headers)]


def open_broker() -> Iterator[Broker]:
    """The body of a module's `broker` fixture: a Broker on the local server (skip if none), closed after."""
    if not nats_answers():
        pytest.skip("no nats-server on 127.0.0.1:4222")
    b = Broker()
    yield b
    b.close()


@contextlib.contextmanager
def temp_stream(broker: Broker, prefix: str = "tw_test", **config: Any) -> Iterator[str]:
    """A new stream `<prefix>_<random>` taking `<name>.>` (unless `subjects` is given); deleted afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    broker.add_stream(name, **config)
    try:
        yield name
    finally:
        broker.delete_stream(name)


def key_counts(rows: list[TagValue]) -> Counter[tuple[str, int]]:
    """How often each (tag, ts) key occurs in `rows`."""
    return Counter((r.tag, r.ts_us) for r in rows)
