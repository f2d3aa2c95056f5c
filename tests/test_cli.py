"""The command line: help of every command, and every option of `tagwriter run` through CliRunner."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import typer
from procs import free_port, summary
from typer.testing import CliRunner, Result

from tagwriter.cli.app import app
from tagwriter.cli.run import status_line
from tagwriter.cli.signals import SignalRequests
from tagwriter.metrics import Metrics
from tagwriter.service import EXIT_MEANINGS

runner = CliRunner()

#: A small, fast simulation: 2 groups x 5 tags every 0.1 s.
FAST_SIM = {"TAGWRITER_SOURCE__GROUPS": "2", "TAGWRITER_SOURCE__TAGS_PER_GROUP": "5",
            "TAGWRITER_SOURCE__INTERVAL": "0.1", "TAGWRITER_WRITER__FLUSH_INTERVAL": "0.05"}

pytestmark = pytest.mark.usefixtures("in_tmp")


def invoke(args: list[str], *, env: dict[str, str] | None = None, input: str | None = None) -> Result:
    return runner.invoke(app, args, env=env, input=input)


def count_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM tag_values").fetchone()[0])


def jsonl(n: int, *, start: int = 1_700_000_000) -> str:
    return "".join(json.dumps({"tag": f"t{i % 10}", "ts": start + i, "value": i / 4}) + "\n" for i in range(n))


# -- help -----------------------------------------------------------------------------


def walk(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, command)]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        found += walk(sub, (*path, name))
    return found


def test_every_command_has_help_with_a_summary_and_an_example() -> None:
    commands = walk(typer.main.get_command(app))
    names = {" ".join(p) for p, _ in commands}
    assert {"run", "config", "config init", "config show", "config validate", "version"} <= names
    for path, _command in commands:
        result = invoke([*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        lines = result.stdout.splitlines()
        summary = lines[lines.index("") + 1].strip() if "" in lines else ""
        assert summary and not summary.startswith("Example"), f"{' '.join(path) or 'tagwriter'}: no summary line"
        if path:  # the top level lists commands instead
            example = re.search(r"^\s*Example: (\w+=\S+ )*tagwriter ", result.stdout, re.M)
            assert example, f"{' '.join(path)}: no Example line"


def test_run_help_gives_every_exit_status() -> None:
    text = " ".join(invoke(["run", "--help"]).stdout.split())
    for code, meaning in EXIT_MEANINGS.items():
        assert f"{int(code)} {meaning}" in text


def test_no_arguments_shows_help_and_unknown_command_is_a_usage_error() -> None:
    assert "Commands" in invoke([]).output
    result = invoke(["frobnicate"])
    assert result.exit_code == 2


def test_version() -> None:
    result = invoke(["version"])
    assert result.exit_code == 0 and re.match(r"tagwriter \d+\.\d+", result.stdout)


def test_version_verbose_names_the_installed_versions() -> None:
    from importlib.metadata import version

    result = invoke(["version", "-v"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for dist in ("rich", "typer", "oracledb"):
        assert f"{dist} {version(dist)}" in lines
    assert "unknown" not in result.stdout


# -- global options after the command --------------------------------------------------------


def test_global_options_may_follow_the_command(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[writer]\nbatch_size = 7\n")
    (tmp_path / "in.jsonl").write_text(jsonl(14))
    result = invoke(["config", "show", "--config", "c.toml", "--log-level", "debug"])
    assert result.exit_code == 0, result.output
    assert "batch_size = 7" in result.stdout and 'level = "DEBUG"' in result.stdout
    result = invoke(["run", "-i", "in.jsonl", "-c", "c.toml", "--log-file=logs/tw.log", "--log-level", "warning"])
    assert result.exit_code == 0, result.output
    assert "batches: 2 written" in result.stdout
    assert "INFO" not in result.stderr
    assert (tmp_path / "logs" / "tw.log").is_file()
    # After the command it wins over the same option before it, as a repeated option does.
    result = invoke(["--config", "missing.toml", "config", "validate", "--config", "c.toml"])
    assert result.exit_code == 0, result.output


def test_hoisting_global_options_leaves_everything_else_in_order() -> None:
    from tagwriter.cli.common import hoist_global_options

    assert hoist_global_options(["run", "-i", "x", "--config", "c.toml", "--seed", "3", "--log-file=l.log"]) == [
        "--config", "c.toml", "--log-file=l.log", "run", "-i", "x", "--seed", "3"]
    assert hoist_global_options(["-c", "a", "run", "--", "--config", "b"]) == ["-c", "a", "run", "--", "--config", "b"]
    assert hoist_global_options(["run", "--config"]) == ["run", "--config"]  # missing value: Click says so


# -- run: the simulated source ---------------------------------------------------------------


def test_run_duration_with_the_simulated_source(tmp_path: Path) -> None:
    began = time.monotonic()
    result = invoke(["run", "--duration", "1"], env=FAST_SIM)
    took = time.monotonic() - began
    assert result.exit_code == 0, result.output
    # The time it reports is the run's own, start to stopped: at least the duration, at most what the call
    # took (rounded to 0.1 s). Not a fixed "1.0s": on a loaded machine start and stop add a tenth or two.
    stopped = re.search(r"stopped after (\d+\.\d)s: duration of 1s reached", result.stdout)
    assert stopped, result.stdout
    assert 1.0 <= float(stopped.group(1)) <= took + 0.05
    counts = summary(result.stdout)
    assert counts["submitted"] >= 50  # 100 values/s for 1 s, the first polls at once
    assert counts["written"] == counts["submitted"] == count_rows(tmp_path / "tagwriter.db")


def test_run_seed_makes_the_simulation_repeatable(tmp_path: Path) -> None:
    env = {**FAST_SIM, "TAGWRITER_SOURCE__VALUE_SHAPE": "constant"}

    def values(seed: int, db: str) -> set[tuple[str, float]]:
        result = invoke(["run", "--duration", "0.3", "--seed", str(seed), "--database", f"sqlite:///{db}"], env=env)
        assert result.exit_code == 0, result.output
        with sqlite3.connect(tmp_path / db) as conn:
            return set(conn.execute("SELECT tag_name, value FROM tag_values"))

    first, again, other = values(7, "a.db"), values(7, "b.db"), values(8, "c.db")
    assert first and first == again
    assert first != other


# -- run: file and stdin sources ------------------------------------------------------------


def test_run_jsonl_file_ends_at_end_of_input(tmp_path: Path) -> None:
    (tmp_path / "in.data").write_text(jsonl(1234))
    result = invoke(["run", "--source", "jsonl", "--input", "in.data"])
    assert result.exit_code == 0, result.output
    assert "end of input" in result.stdout
    assert summary(result.stdout)["written"] == 1234 == count_rows(tmp_path / "tagwriter.db")


def test_run_csv_kind_from_the_file_name(tmp_path: Path) -> None:
    body = "".join(f"t{i},{1e9 + i},{i},192\n" for i in range(300))
    (tmp_path / "in.csv").write_text("tag,ts,value,quality\n" + body)
    result = invoke(["run", "-i", "in.csv"])
    assert result.exit_code == 0, result.output
    assert count_rows(tmp_path / "tagwriter.db") == 300


def test_run_stdin_with_malformed_lines_loses_nothing(tmp_path: Path) -> None:
    lines = jsonl(500).splitlines()
    bad_at = [3, 250, 499]  # 1-based line numbers of the bad lines
    for n in bad_at:
        lines.insert(n - 1, '{"tag": "x", "ts": "when?", "value": 1}' if n == 250 else "garbage")
    result = invoke(["run", "--source", "jsonl", "--input", "-"], input="\n".join(lines) + "\n")
    assert result.exit_code == 3, result.output  # finished, nothing lost, but the input was bad
    counts = summary(result.stdout)
    assert counts["written"] == 500 == count_rows(tmp_path / "tagwriter.db")
    assert "malformed input lines: 3, kept in backup/quarantine" in result.stdout
    assert "warning: 3 input lines were malformed (exit status 3)" in result.stderr
    assert "stdin:3: not JSON" in result.stderr and "stdin:250: ts 'when?'" in result.stderr
    kept = "".join(p.read_text() for p in sorted((tmp_path / "backup" / "quarantine").glob("*.csv")))
    for n in bad_at:
        assert f",stdin:{n}," in kept


def test_run_csv_without_header_exits_1(tmp_path: Path) -> None:
    result = invoke(["run", "--source", "csv", "--input", "-"], input="a,1,2\n")
    assert result.exit_code == 1
    assert "error: stdin:1: csv header 'a,1,2' lacks tag, ts, value" in result.stderr


def test_run_input_errors(tmp_path: Path) -> None:
    result = invoke(["run", "--input", "missing.jsonl"])
    assert result.exit_code == 1
    assert "error: source.path = 'missing.jsonl': no such input file" in result.stderr
    (tmp_path / "data.txt").write_text(jsonl(1))
    result = invoke(["run", "--input", "data.txt"])
    assert result.exit_code == 2
    assert "--source jsonl" in result.stderr
    result = invoke(["run", "--source", "xml"])
    assert result.exit_code == 2


# -- run: database and writer options -------------------------------------------------------


def test_run_database_option(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(jsonl(10))
    result = invoke(["run", "-i", "in.jsonl", "--database", f"sqlite:///{tmp_path / 'sub' / 'other.db'}"])
    assert result.exit_code == 0, result.output
    assert count_rows(tmp_path / "sub" / "other.db") == 10
    assert not (tmp_path / "tagwriter.db").exists()


def test_run_refuses_a_password_on_the_command_line() -> None:
    result = invoke(["run", "--database", "postgresql://app:s3cret@127.0.0.1:5432/plant"])
    assert result.exit_code == 2
    assert "s3cret" not in result.output and "s3cret" not in result.stderr
    assert "TAGWRITER_DATABASE_PASSWORD" in result.stderr


def test_run_unknown_database_kind() -> None:
    result = invoke(["run", "--database", "mysql://db/x"])
    assert result.exit_code == 2  # a bad flag value is a usage error
    assert result.stderr.startswith("error: --database = 'mysql://db/x': unknown database kind")


def test_run_batch_size_and_flush_interval(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(jsonl(70))
    result = invoke(["run", "-i", "in.jsonl", "--batch-size", "7", "--flush-interval", "0.05"])
    assert result.exit_code == 0, result.output
    assert "batches: 10 written, 0 failed" in result.stdout

    # A bad flag value is a usage error (exit 2) naming the flag; from the environment, exit 1 naming the variable.
    result = invoke(["run", "--batch-size", "0"])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == "error: --batch-size: writer.batch_size = 0: must be between 1 and 10000"
    result = invoke(["run", "--flush-interval", "0"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --flush-interval: writer.flush_interval = 0.0: must be between 0.001")
    result = invoke(["run", "--metrics-port", "70000"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --metrics-port: metrics.port = 70000")
    result = invoke(["run", "--duration", "1"], env={"TAGWRITER_WRITER__BATCH_SIZE": "0"})
    assert result.exit_code == 1
    assert result.stderr.startswith("error: environment TAGWRITER_WRITER__BATCH_SIZE: writer.batch_size = 0: ")


def test_run_duration_must_be_positive() -> None:
    assert invoke(["run", "--duration", "0"]).exit_code == 2


# -- run: panel, status lines, logging, metrics port ----------------------------------------


def test_run_panel_on_a_terminal(tmp_path: Path) -> None:
    result = invoke(["run", "--duration", "0.6"], env={**FAST_SIM, "TTY_COMPATIBLE": "1"})
    assert result.exit_code == 0, result.output
    assert "╭─ tagwriter → sqlite:///tagwriter.db table tag_values" in result.stdout
    assert "buffer" in result.stdout and "write latency" in result.stdout
    assert "stopped" in result.stdout  # the last frame shows the final state


def test_run_no_panel_logs_status_lines(tmp_path: Path) -> None:
    env = {**FAST_SIM, "TTY_COMPATIBLE": "1", "TAGWRITER_METRICS__LOG_INTERVAL": "0.2"}
    result = invoke(["run", "--duration", "1", "--no-panel"], env=env)
    assert result.exit_code == 0, result.output
    assert "╭─" not in result.stdout
    status = [line for line in result.stderr.splitlines() if "| buffer " in line]
    assert 2 <= len(status) <= 6, result.stderr
    assert re.search(r"writing \| buffer \d+/100000 \(\d+\.\d%\) \| in \d+/s out \d+/s \| written \d+", status[-1])


def test_run_log_level_and_log_file(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(jsonl(5))
    result = invoke(["--log-level", "warning", "--log-file", "logs/tw.log", "run", "-i", "in.jsonl"])
    assert result.exit_code == 0, result.output
    assert "INFO" not in result.stderr
    result = invoke(["--log-file", "logs/tw.log", "run", "-i", "in.jsonl"])
    assert "stopping: end of input" in (tmp_path / "logs" / "tw.log").read_text()


def test_run_metrics_port_serves_while_running() -> None:
    port = free_port()
    answers: list[int] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set() and not answers:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/buffer/metrics", timeout=1) as r:
                    answers.append(r.status)
            except OSError:
                done.wait(0.05)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    result = invoke(["run", "--duration", "1.5", "--metrics-port", str(port)], env=FAST_SIM)
    done.set()
    thread.join(5)
    assert result.exit_code == 0, result.output
    assert answers == [200]


# -- run: exit status 1 -----------------------------------------------------------------------


def test_run_exits_1_when_the_database_refuses_writes(tmp_path: Path) -> None:
    (tmp_path / "bad.db").write_bytes(b"this is not a SQLite database file, just text" * 20)
    (tmp_path / "in.jsonl").write_text(jsonl(20))
    result = invoke(["run", "-i", "in.jsonl", "--database", "sqlite:///bad.db"])
    assert result.exit_code == 1
    assert summary(result.stdout)["spooled"] == 20
    assert "error: the database refused writes: SQLITE_NOTADB" in result.stderr


def test_run_exits_1_when_values_cannot_be_spooled(tmp_path: Path) -> None:
    (tmp_path / "bad.db").write_bytes(b"this is not a SQLite database file, just text" * 20)
    (tmp_path / "afile").write_text("a file where the backup folder should be")
    (tmp_path / "in.jsonl").write_text(jsonl(20))
    env = {"TAGWRITER_BACKUP__DIRECTORY": "afile/backup"}
    result = invoke(["run", "-i", "in.jsonl", "--database", "sqlite:///bad.db"], env=env)
    assert result.exit_code == 1
    # Found at start, before any value is taken (not at the first outage).
    assert "error: the backup folder afile/backup cannot be made:" in result.stderr
    assert "hint: check backup.directory" in result.stderr
    assert "submitted" not in result.stdout


# -- pieces -----------------------------------------------------------------------------------


def test_second_signal_asks_to_hurry() -> None:
    requests = SignalRequests()
    requests.handle(signal.SIGTERM, None)
    assert requests.stop.is_set() and not requests.hurry.is_set() and requests.reason == "SIGTERM"
    requests.handle(signal.SIGINT, None)
    assert requests.hurry.is_set() and requests.reason == "SIGTERM"


def test_status_line_is_one_concise_line() -> None:
    m = Metrics()
    m.record_submitted(10)
    line = status_line(m.snapshot(buffer_size=10, buffer_capacity=100))
    assert "\n" not in line
    assert line.startswith("starting | buffer 10/100 (10.0%) | in ")


def test_run_never_logs_a_password_from_the_url(tmp_path: Path) -> None:
    """A PostgreSQL URL whose password holds '@' and '/', to a port nobody listens on: the run spools."""
    secret = "p@ss/w0rd"
    (tmp_path / "c.toml").write_text(
        f'[database]\nurl = "postgresql://app:{secret}@127.0.0.1:{free_port()}/plant?password=qp4ss"\n'
        "connect_timeout = 0.5\n"
    )
    (tmp_path / "in.jsonl").write_text(jsonl(20))
    result = invoke(["run", "-i", "in.jsonl", "--config", "c.toml", "--log-level", "debug", "--log-file", "tw.log"])
    for text in (result.stdout, result.stderr):
        for part in (secret, "p@ss", "w0rd", "qp4ss"):
            assert part not in text, text
    assert summary(result.stdout)["spooled"] == 20, result.output
    log_text = (tmp_path / "tw.log").read_text()
    assert "stopping: end of input" in log_text
    for part in (secret, "p@ss", "w0rd", "qp4ss"):
        assert part not in log_text


def test_version_flag_prints_the_version_and_exits() -> None:
    from tagwriter._version import __version__

    result = invoke(["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"tagwriter {__version__}\n"
