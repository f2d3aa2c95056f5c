"""`tagwriter jetstream setup|status`, and `init-db` / `test-connection` with a nats:// database URL,
against the real nats-server on 127.0.0.1:4222 (each test its own stream, deleted after)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats_util import Broker, needs_nats, open_broker
from rich.console import Console
from typer.testing import CliRunner

from tagwriter.cli.app import app
from tagwriter.cli.jetstream import render_status
from tagwriter.models import TagValue
from tagwriter.sinks.jetstream import JetStreamSink
from tagwriter.streamadmin import (
    ConsumerLag,
    StreamSettings,
    StreamStatus,
    default_subjects,
    parse_duration,
    parse_size,
    stream_config,
    stream_differences,
)

pytestmark = needs_nats


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    yield from open_broker()


@pytest.fixture
def name(broker: Broker) -> Iterator[str]:
    """A stream name no other test uses; whatever a command made under it is deleted afterwards."""
    stream = f"tw_cli_{uuid.uuid4().hex[:10]}"
    yield stream
    broker.delete_stream(stream)


def invoke(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    config = tmp_path / "tagwriter.toml"
    config.touch()
    result = CliRunner().invoke(app, list(args), env={"TAGWRITER_CONFIG": str(config), "COLUMNS": "200",
                                                      **(env or {})})
    return result.exit_code, result.output


def publish(stream: str, subject: str, batches: int) -> None:
    sink = JetStreamSink(servers=["nats://127.0.0.1:4222"], stream=stream, subject=subject)
    try:
        for k in range(batches):
            sink.write_batch([TagValue(f"t{j}", (1_700_000_000 + k) * 1_000_000, float(j)) for j in range(100)])
    finally:
        sink.close()


# -- no server needed ---------------------------------------------------------------------


def test_sizes_durations_and_default_subjects_read_as_an_operator_writes_them() -> None:
    assert parse_size("10GiB") == 10 * 2**30 and parse_size("512M") == 512 * 2**20 and parse_size("none") == -1
    assert parse_size("1048576") == 2**20
    assert parse_duration("7d") == 7 * 86_400 and parse_duration("2m") == 120 and parse_duration("none") == 0
    assert default_subjects("PLANT", "plant.edge1") == ("plant.>",)
    assert default_subjects("PLANT", "PLANT.batches") == ("PLANT.>",)
    assert default_subjects("PLANT", "") == ("PLANT.>",) and default_subjects("X", "single") == ("single",)


def test_stream_differences_name_each_setting_with_both_values() -> None:
    want = stream_config(StreamSettings("S", ("s.>",), max_bytes=2**30), 3)
    have = {**want, "subjects": ["s.>", "t.>"], "num_replicas": 1, "max_age": 86_400 * 10**9, "discard": "old"}
    assert stream_differences(want, want) == []
    assert stream_differences(have, want) == [
        "subjects s.>, t.> (wanted s.>)", "num_replicas 1 (wanted 3)", "max_age 86400s (wanted none)",
        "discard old (wanted new)"]
    limits = stream_config(StreamSettings("S", ("s.>",), retention="limits"), 1)
    assert limits["max_age"] == 7 * 86_400 * 10**9 and limits["discard"] == "new"


def test_the_status_table_shows_lag_per_consumer() -> None:
    state = StreamStatus("PLANT", ["plant.>"], "workqueue", "file", 3, 2**30, 0.0, 120, 2**20, 5, 124, 12.5,
                         leader="n1", peers=[{"name": "n2", "current": True, "offline": False, "lag": 0},
                                             {"name": "n3", "current": False, "offline": True, "lag": 7}],
                         consumers=[ConsumerLag("writers", "", 120, 8, 3, 2, 4, 4, 30.0, 10_000, "")])
    console = Console(width=160, color_system=None, record=True)
    console.print(render_status(state, 3))
    text = console.export_text()
    assert "stream PLANT (plant.>): workqueue, file, replicas 3 on a cluster of 3" in text
    assert "120 messages, 1 MiB of 1 GiB, oldest 12.5 s" in text and "leader n1; replicas n2, n3 offline lag 7" in text
    assert "│ writers  │ all    │     120 │            8 │           3 │             2 │         4 │" in text


# -- jetstream setup / status ---------------------------------------------------------------


def test_setup_creates_the_stream_and_consumer_then_finds_them_as_wanted(tmp_path: Path, broker: Broker,
                                                                         name: str) -> None:
    env = {"TAGWRITER_JETSTREAM__DURABLE": "writers", "TAGWRITER_JETSTREAM__ACK_WAIT": "10"}
    args = ("jetstream", "setup", "--stream", name, "--subjects", f"{name}.>", "--max-bytes", "64MiB")
    code, out = invoke(tmp_path, *args, env=env)
    assert code == 0, out
    assert f"stream {name}: created (subjects {name}.>; workqueue, file, replicas 1, discard new, " \
           "max_bytes 64 MiB, max_age none, duplicate_window 120s)" in out
    assert f"consumer writers on stream {name}: created (pull, explicit acks, ack_wait 10s" in out
    info = broker.info(name)
    assert (info.config.max_bytes, info.config.num_replicas) == (64 * 2**20, 1)
    assert broker.consumer(name, "writers").config.ack_wait == 10.0
    code, out = invoke(tmp_path, *args, env=env)
    assert code == 0 and "exists as wanted" in out and "created" not in out


def test_setup_never_changes_an_existing_stream_it_lists_the_differences(tmp_path: Path, broker: Broker,
                                                                         name: str) -> None:
    code, out = invoke(tmp_path, "jetstream", "setup", "--stream", name, "--max-bytes", "64MiB", "--no-consumer")
    assert code == 0, out
    code, out = invoke(tmp_path, "jetstream", "setup", "--stream", name, "--max-bytes", "128MiB",
                       "--retention", "limits", "--no-consumer")
    assert code == 1
    assert (f"stream {name} exists with other settings: retention workqueue (wanted limits); "
            "max_bytes 64 MiB (wanted 128 MiB); max_age none (wanted 604800s)") in " ".join(out.split())
    assert "tagwriter never changes an existing stream or consumer" in out
    assert broker.info(name).config.max_bytes == 64 * 2**20  # untouched
    code, out = invoke(tmp_path, "jetstream", "setup", "--stream", name, "--print", "--no-consumer")
    assert code == 0 and json.loads(out)["stream"]["discard"] == "new"


def test_status_shows_the_messages_and_the_lag_of_each_consumer(tmp_path: Path, broker: Broker, name: str) -> None:
    env = {"TAGWRITER_JETSTREAM__DURABLE": "writers"}
    assert invoke(tmp_path, "jetstream", "setup", "--stream", name, "--max-bytes", "64MiB", env=env)[0] == 0
    publish(name, f"{name}.edge1", 7)
    code, out = invoke(tmp_path, "jetstream", "status", "--stream", name, "--json")
    assert code == 0, out
    state = json.loads(out)
    assert (state["messages"], state["last_seq"], state["retention"]) == (7, 7, "workqueue")
    [writers] = state["consumers"]
    assert (writers["name"], writers["pending"], writers["ack_pending"], writers["redelivered"]) == ("writers", 7, 0, 0)
    assert state["oldest_age_s"] is not None and state["oldest_age_s"] < 60
    code, out = invoke(tmp_path, "jetstream", "status", "--stream", name)
    assert code == 0 and f"stream {name} ({name}.>): workqueue" in out and "writers" in out


def test_status_of_a_missing_stream_is_one_error_with_a_hint(tmp_path: Path, name: str) -> None:
    code, out = invoke(tmp_path, "jetstream", "status", "--stream", name)
    assert code == 1 and f"stream {name} does not exist" in out and "tagwriter jetstream setup" in out


# -- init-db and test-connection with a nats:// URL -----------------------------------------


def test_init_db_makes_the_stream_once_and_refuses_a_subject_it_does_not_take(tmp_path: Path, broker: Broker,
                                                                              name: str) -> None:
    code, out = invoke(tmp_path, "init-db", "--database", f"nats://127.0.0.1:4222/{name}/{name}.edge1")
    assert code == 0, out
    assert f"stream {name}: created (subjects {name}.>; workqueue" in out
    code, out = invoke(tmp_path, "init-db", "--database", f"nats://127.0.0.1:4222/{name}/{name}.edge2")
    assert code == 0 and "nothing to do" in out
    code, out = invoke(tmp_path, "init-db", "--database", f"nats://127.0.0.1:4222/{name}/other.edge3")
    assert code == 1 and f"stream {name} does not take subject other.edge3" in out
    code, out = invoke(tmp_path, "init-db", "--print", "--database", f"nats://127.0.0.1:4222/{name}/x.y")
    assert code == 0 and json.loads(out)["subjects"] == ["x.>"]


def test_test_connection_checks_the_stream_and_a_publish_that_stores_nothing(tmp_path: Path, broker: Broker,
                                                                             name: str) -> None:
    url = f"nats://127.0.0.1:4222/{name}/{name}.edge1"
    code, out = invoke(tmp_path, "test-connection", "--json", "--database", url)
    assert code == 1
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["stream exists"]["status"] == "fail" and checks["stream exists"]["code"] == "STREAM_MISSING"
    assert checks["publish allowed"]["status"] == "skipped"
    assert invoke(tmp_path, "init-db", "--database", url)[0] == 0
    code, out = invoke(tmp_path, "test-connection", "--json", "--database", url)
    assert code == 0, out
    report = json.loads(out)
    assert [c["status"] for c in report["checks"]] == ["pass"] * 7
    assert "JetStream on" in report["checks"][2]["detail"]
    assert broker.info(name).state.messages == 0  # the publish check stored nothing
