"""An edge-to-fleet deployment on one machine for tests and benchmarks: edge gateways publishing to a
JetStream stream, writer processes sharing its durable consumer, one PostgreSQL table.

Every part is a real `tagwriter` process started as a user starts it (`procs.start_run`) with its own
config file and folders under one work folder:

    edges:   source jsonl (a file, or stdin) -> database.url = nats://.../STREAM/STREAM.edgeN
    writers: source jetstream (durable "writers") -> database.url = postgresql://...

Input values are (tag eN.tJJJ, ts T0 + k s, value k + JJJ / 1000): 100 tags a poll, so the expected
rows of an edge are known exactly. `cpu_seconds` reads a process's CPU time from /proc.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from procs import free_port, metrics, run_env, start_run

T0 = 1_700_000_000
TAGS = 100
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def input_lines(edge: int, start: int, n: int) -> list[str]:
    """Values `start` .. `start + n` of edge `edge` as jsonl lines (one value a line)."""
    out = []
    for i in range(start, start + n):
        k, j = divmod(i, TAGS)
        out.append(f'{{"tag": "e{edge}.t{j:03d}", "ts": {T0 + k}, "value": {k + j / 1000}}}\n')
    return out


def write_input(path: Path, edge: int, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n, 100_000):
            f.writelines(input_lines(edge, start, min(100_000, n - start)))
    return path


def expected_sum(edge_values: dict[int, int]) -> float:
    """The sum of every value the edges' inputs hold (edge -> values)."""
    return sum(k + j / 1000 for n in edge_values.values() for i in range(n) for k, j in [divmod(i, TAGS)])


@dataclass
class Part:
    """One tagwriter process of the deployment: its folder, config, metrics port and current process."""

    name: str
    folder: Path
    config: Path
    port: int
    args: tuple[str, ...] = ()
    stdin: int | None = None
    proc: subprocess.Popen[str] | None = None
    outputs: list[tuple[int | None, str, str]] = field(default_factory=list)  # (exit code, stdout, stderr) per run

    def start(self) -> Part:
        self.proc = start_run(self.folder, "--config", str(self.config), "--no-panel", *self.args,
                              env=run_env(), stdin=self.stdin)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def metric(self, name: str) -> Any:
        figures = metrics(self.port)
        return None if figures is None else figures.get(name)

    def kill(self) -> None:
        """kill -9, and keep what it printed."""
        assert self.proc is not None
        self.proc.kill()
        self.outputs.append((None, *self.proc.communicate(timeout=30)))

    def wait(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the process to end by itself; its exit code and output (kept)."""
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=timeout)
        self.outputs.append((self.proc.returncode, out, err))
        return self.proc.returncode, out, err

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the running process."""
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def edge(work: Path, n: int, stream: str, *, nats: str = "127.0.0.1:4222", input_path: str | None = None,
         batch_size: int = 2000) -> Part:
    """Edge gateway `n`: a jsonl file (or '-': stdin) into the stream, subject STREAM.edgeN, disk queue."""
    folder = work / f"edge{n}"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "tagwriter.toml"
    config.write_text(tomli_w.dumps({
        "source": {"kind": "jsonl", "path": input_path or str(folder / "input.jsonl")},
        "database": {"url": f"nats://{nats}/{stream}/{stream}.edge{n}", "connect_timeout": 2.0,
                     "call_timeout": 5.0},
        "writer": {"batch_size": batch_size, "flush_interval": 0.2, "retry_delays": [0.5, 1.0],
                   "probe_interval": 0.5, "probe_max_interval": 2.0, "shutdown_timeout": 10.0},
        "buffer": {"durability": "disk", "directory": str(folder / "queue")},
        "backup": {"directory": str(folder / "backup"), "quarantine_directory": str(folder / "backup" / "q")},
        "metrics": {"port": port, "log_interval": 5.0},
    }))
    return Part(f"edge{n}", folder, config, port, stdin=subprocess.PIPE if input_path == "-" else None)


def writer(work: Path, n: int, stream: str, database_url: str, *, durable: str = "writers") -> Part:
    """Writer `n` of the fleet on the stream's `durable`, memory durability (JetStream is the queue)."""
    folder = work / f"writer{n}"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "tagwriter.toml"
    config.write_text(tomli_w.dumps(writer_sections(stream, database_url, folder, port, durable=durable)))
    return Part(f"writer{n}", folder, config, port)


def writer_sections(stream: str, database_url: str, folder: Path, port: int = 0, *, durable: str = "writers",
                    fetch_batch: int = 4, ack_wait: float = 5.0, batch_size: int = 5000) -> dict[str, dict[str, Any]]:
    """A writer's config: fetches of `fetch_batch` messages (of an edge's 2,000-value batches), acks after
    the database commit (memory durability), `ack_wait` before a dead writer's messages go to another."""
    return {
        "source": {"kind": "jetstream"},
        "jetstream": {"servers": "nats://127.0.0.1:4222", "stream": stream, "durable": durable,
                      "fetch_batch": fetch_batch, "fetch_timeout": 0.5, "ack_wait": ack_wait,
                      "max_ack_pending": 1000, "reconnect_wait": 0.5},
        "buffer": {"durability": "memory", "capacity": 100_000},
        "writer": {"batch_size": batch_size, "flush_interval": 0.2, "shutdown_timeout": 5.0},
        "database": {"url": database_url},
        "backup": {"directory": str(folder / "backup"), "quarantine_directory": str(folder / "backup" / "q")},
        "metrics": {"port": port, "log_interval": 5.0},
    }


def setup_stream(work: Path, stream: str, database_url: str) -> str:
    """`tagwriter jetstream setup` for the fleet (work queue, 1 GiB, the writers' consumer); its output."""
    config = work / "setup.toml"
    config.write_text(tomli_w.dumps(writer_sections(stream, database_url, work)))
    done = subprocess.run(
        [*tagwriter_argv(), "--config", str(config), "jetstream", "setup", "--subjects", f"{stream}.>",
         "--max-bytes", "1GiB"], cwd=work, env=run_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([*tagwriter_argv(), "--config", str(config), "init-db"], cwd=work, env=run_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def tagwriter_argv() -> list[str]:
    return [sys.executable, "-m", "tagwriter"]
