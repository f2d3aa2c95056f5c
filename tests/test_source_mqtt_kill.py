"""kill -9 `tagwriter run --source mqtt` in the middle of a QoS 1 stream, restart it: every value once.

A private Mosquitto (started here on a free loopback port) with `max_queued_messages` raised: the
default (1000) makes the broker itself drop what queues for a client that is down or holds its
acknowledgements until the values are durable ("Outgoing messages are being dropped" in its log);
README's MQTT section says to raise it. The disk queue (run's default) is what makes this exact.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from procs import free_port, run_env
from waits import wait_until

pytestmark = pytest.mark.slow

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
N = 8000
KILLS = 3


def _rows(db: Path) -> tuple[int, int]:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT count(*), count(DISTINCT tag_name || ts) FROM tag_values").fetchone()
    except sqlite3.Error:  # not made yet
        return 0, 0


def test_kill_9_in_a_qos1_stream_then_restart_writes_every_value_exactly_once(tmp_path: Path) -> None:
    mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed (the [mqtt] extra)")
    if not Path(MOSQUITTO).exists():
        pytest.skip("no mosquitto binary to start a private broker")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 1000000\nmax_inflight_messages 1000\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs: list[subprocess.Popen[bytes]] = []
    (tmp_path / "tagwriter.toml").write_text(
        f'[source]\nkind = "mqtt"\n[mqtt]\nport = {port}\ntopics = ["kill/#"]\nclient_id = "tw-kill-test"\n'
        '[database]\nurl = "sqlite:///t.db"\n[writer]\nflush_interval = 0.05\n')
    log = (tmp_path / "run.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "tagwriter", "run", "--no-panel"], cwd=tmp_path,
                                env=run_env(PYTHONUNBUFFERED="1"), stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    db = tmp_path / "t.db"
    try:
        proc = start()
        # Subscribed, not just started: what the broker gets before the first subscription it keeps for no one.
        wait_until(lambda: "subscribed to 'kill/#'" in (tmp_path / "run.log").read_text(), "the subscription", 30)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tw-kill-pub", protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        kills = 0
        infos = []
        for i in range(N):
            payload = json.dumps({"value": i, "ts": 1_700_000_000 + i})
            infos.append(pub.publish(f"kill/t{i % 50}", payload, qos=1))
            infos[-1].wait_for_publish(5)  # (returns silently after 5 s: checked below)
            if kills < KILLS and i + 1 == (kills + 1) * N // (KILLS + 1):
                wait_until(lambda: _rows(db)[0] > 0, "some rows before the kill", 30)
                proc.send_signal(signal.SIGKILL)  # mid-stream: values received, some durable, some not
                proc.wait(10)
                kills += 1
                proc = start()
        # A publish the broker never acknowledged is the publisher's loss, not tagwriter's: say so.
        wait_until(lambda: all(info.is_published() for info in infos), "the broker's PUBACK for every publish", 60)
        pub.loop_stop()
        pub.disconnect()
        try:
            wait_until(lambda: _rows(db)[0] >= N, f"all {N} values in the table", 120)
        except AssertionError:
            with sqlite3.connect(db) as conn:
                stored = {int(v) for (v,) in conn.execute("SELECT value FROM tag_values")}
            missing = sorted(set(range(N)) - stored)
            raise AssertionError(f"{len(missing)} values missing from the table: {missing[:40]}; kills after "
                                 f"values {[(k + 1) * N // (KILLS + 1) for k in range(KILLS)]}; run log: "
                                 f"{(tmp_path / 'run.log').read_text()[-3000:]}"
                                 ) from None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        broker.kill()
        broker.wait(10)
        log.close()
    total, distinct = _rows(db)
    recovered = (tmp_path / "run.log").read_text().count("were queued and not written when the last run ended")
    print(f"\nmqtt kill -9: published {N}, kills {kills}, rows {total} (distinct {distinct}); "
          f"{recovered} restarts recovered values from the queue")
    assert kills == KILLS
    assert total == distinct == N
