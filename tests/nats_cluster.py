"""A 3-node NATS JetStream cluster on loopback ports, for tests and for trying the fleet by hand.

    with NatsCluster(tmp_path) as cluster:      # three nats-server processes, one cluster, JetStream on
        cluster.urls                            # "nats://127.0.0.1:P1,nats://127.0.0.1:P2,nats://127.0.0.1:P3"
        cluster.kill("n2")                      # SIGKILL one node; cluster.start("n2") brings it back

    python tests/nats_cluster.py [FOLDER]       # runs one until Ctrl-C, printing its URLs

Each node has its own store folder, client port and route port; every node lists every route.
`wait_ready` waits until the JetStream meta group has a leader (the API answers), which takes a
few seconds after start. Needs the `nats-server` binary (PATH, or /usr/sbin, /usr/local/bin).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

NAMES = ("n1", "n2", "n3")
CANDIDATES = ("/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server")


def nats_server_binary() -> str | None:
    """The nats-server executable, or None."""
    found = shutil.which("nats-server")
    if found:
        return found
    return next((c for c in CANDIDATES if Path(c).is_file()), None)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsCluster:
    """Three nats-server processes in one JetStream cluster on 127.0.0.1. A context manager."""

    def __init__(self, folder: Path, *, binary: str | None = None, cluster: str = "twtest") -> None:
        binary = binary or nats_server_binary()
        if binary is None:
            raise FileNotFoundError("nats-server is not installed (not on PATH, nor in /usr/sbin or /usr/local/bin)")
        self.binary = binary
        self.folder = folder
        ports = _free_ports(2 * len(NAMES))
        self.client_ports = dict(zip(NAMES, ports[:len(NAMES)], strict=True))
        self.route_ports = dict(zip(NAMES, ports[len(NAMES):], strict=True))
        self.cluster = cluster
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.route_ports.values())
        for name in NAMES:
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.conf").write_text(
                f"server_name: {name}\n"
                f"listen: 127.0.0.1:{self.client_ports[name]}\n"
                f"jetstream {{ store_dir: \"{folder / name}\", max_file_store: 1G, max_memory_store: 64M }}\n"
                f"cluster {{ name: {cluster}, listen: 127.0.0.1:{self.route_ports[name]}, routes: [{routes}] }}\n")

    @property
    def urls(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports.values())

    def url(self, name: str) -> str:
        return f"nats://127.0.0.1:{self.client_ports[name]}"

    def start(self, name: str) -> None:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        self.procs[name] = subprocess.Popen([self.binary, "-c", str(self.folder / f"{name}.conf")],
                                            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self, name: str) -> None:
        """SIGKILL one node and reap it."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def __enter__(self) -> NatsCluster:
        for name in NAMES:
            self.start(name)
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every node takes clients and JetStream can place a replicas-3 stream (the meta group has a
        leader and knows all three peers; a stream made and deleted again proves it)."""
        import asyncio

        import nats
        from nats.js import api

        async def api_answers() -> bool:
            try:
                nc = await nats.connect(self.urls.split(","), connect_timeout=1, max_reconnect_attempts=0)
            except Exception:
                return False
            try:
                js = nc.jetstream(timeout=2)
                await js.add_stream(api.StreamConfig(name="tw_ready_probe", subjects=["tw.ready.probe"],
                                                     num_replicas=3, storage=api.StorageType.MEMORY))
                await js.delete_stream("tw_ready_probe")
                return True
            except Exception:
                return False
            finally:
                await nc.close()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(_answers(p) for p in self.client_ports.values()) and asyncio.run(api_answers()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the JetStream cluster in {self.folder} was not ready within {timeout:g} s")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "nats-cluster").resolve()
    with NatsCluster(folder) as cluster:
        cluster.wait_ready()
        print(f"3-node JetStream cluster {cluster.cluster} up: {cluster.urls} (stores in {folder}); "
              "Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
