"""Benchmark: metrics endpoint response times under full load, and its cost to the writer.

Not collected by pytest. Run:  python tests/benchmarks/bench_endpoint.py [--seconds 6] [--repeats 3]

A producer thread feeds a Pipeline as fast as it takes (overflow policy
`block`, polling groups of 500 values, a fresh SQLite file per phase). Phases,
alternated `repeats` times in one run:
- baseline: nobody scrapes;
- paced:    a client process reads /api/buffer/metrics, /metrics, /healthz
            every 100 ms (30 requests/s; Prometheus' default is one every 15 s);
- flat-out: a client process requests the three paths back to back;
- burst-40: once a second, 40 concurrent requests (threads) to the three paths,
            as when many scrapers or dashboards ask at the same moment.
The client runs in its own process (as Prometheus would) and times each
response end to end (connect to last byte). Reported: p50 / p99 / max response
time per mode (target: every response < 500 ms), and the writer's throughput
with scraping as a ratio of the baseline (medians over the repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

PATHS = ("/api/buffer/metrics", "/metrics", "/healthz")
WARMUP = 1.0


def fetch(url: str) -> float | None:
    """One request, timed connect to last byte; None on a transport error."""
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:  # 503 from /healthz is an answer too
        exc.read()
        exc.close()
    except OSError:
        return None
    return time.perf_counter() - t


def burst_client(url: str, seconds: float, n: int = 40) -> None:
    """Runs in the child process: every second, `n` concurrent requests; print their times as JSON."""
    from concurrent.futures import ThreadPoolExecutor

    times: list[float] = []
    errors = 0
    end = time.monotonic() + seconds
    with ThreadPoolExecutor(n) as pool:
        while time.monotonic() < end:
            started = time.monotonic()
            for took in pool.map(fetch, [url + PATHS[i % len(PATHS)] for i in range(n)]):
                if took is None:
                    errors += 1
                else:
                    times.append(took)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    print(json.dumps({"times": times, "errors": errors}))


def client(url: str, seconds: float, pace: float) -> None:
    """Runs in the child process: hit PATHS round-robin, print response times (s) as JSON."""
    if pace < 0:
        burst_client(url, seconds)
        return
    times: list[float] = []
    errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        round_start = time.monotonic()
        for path in PATHS:
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(url + path, timeout=5) as resp:
                    resp.read()
            except urllib.error.HTTPError as exc:  # 503 from /healthz is an answer too
                exc.read()
                exc.close()
            except OSError:
                errors += 1
                continue
            times.append(time.perf_counter() - t)
        if pace:
            time.sleep(max(0.0, pace - (time.monotonic() - round_start)))
    print(json.dumps({"times": times, "errors": errors}))


def phase(mode: str, seconds: float, work: Path) -> dict[str, object]:
    from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig
    from tagwriter.endpoint import MetricsServer
    from tagwriter.models import PollingData
    from tagwriter.pipeline import Pipeline

    work.mkdir()
    cfg = Config(
        database=DatabaseConfig(url=f"sqlite:///{work / 'bench.db'}"),
        buffer=BufferConfig(capacity=100_000, overflow_policy="block", block_timeout=30.0),
        backup=BackupConfig(directory=str(work / "backup"), quarantine_directory=str(work / "quarantine")),
    )
    pipeline = Pipeline(cfg).start()
    server = MetricsServer(pipeline, port=0).start()
    stop = threading.Event()
    values = {f"line.tag{i:03d}": float(i) for i in range(500)}

    def produce() -> None:
        ts = 1_700_000_000.0
        while not stop.is_set():
            pipeline.submit(PollingData("line", ts, values))
            ts += 0.001

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    proc = None
    if mode != "baseline":
        pace = {"paced": "0.1", "flat-out": "0", "burst-40": "-1"}[mode]
        proc = subprocess.Popen(
            [sys.executable, __file__, "--client", server.url, "--seconds", str(seconds + WARMUP), "--pace", pace],
            stdout=subprocess.PIPE, text=True,
        )
    time.sleep(WARMUP)
    w0, t0 = pipeline.snapshot().written, time.perf_counter()
    time.sleep(seconds)
    w1, t1 = pipeline.snapshot().written, time.perf_counter()
    out: dict[str, object] = {"rate": (w1 - w0) / (t1 - t0)}
    if proc is not None:
        stdout, _ = proc.communicate(timeout=seconds + 30)
        out.update(json.loads(stdout))
    stop.set()
    producer.join(35)
    server.stop(1.0)
    pipeline.stop(30.0)
    snap = pipeline.snapshot()
    assert snap.dropped == 0 and snap.pending == 0, snap
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per phase")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--pace", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client(args.client, args.seconds, args.pace)
        return
    modes = ("baseline", "paced", "flat-out", "burst-40")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    errors = dict.fromkeys(modes, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for mode in modes:
                r = phase(mode, args.seconds, Path(tmp) / f"{mode}-{rep}")
                rates[mode].append(float(r["rate"]))  # type: ignore[arg-type]
                times[mode] += r.get("times", [])  # type: ignore[operator]
                errors[mode] += int(r.get("errors", 0))  # type: ignore[call-overload]
                print(f"rep {rep + 1} {mode:9s} {r['rate']:>10,.0f} values/s written", flush=True)
    base = statistics.median(rates["baseline"])
    print(f"\nwriter throughput, median of {args.repeats} x {args.seconds:g} s phases (SQLite, 500-value groups):")
    print(f"  baseline (no scraping): {base:>10,.0f} values/s  "
          f"(range {min(rates['baseline']):,.0f}-{max(rates['baseline']):,.0f}: the noise floor)")
    for mode in modes[1:]:
        med = statistics.median(rates[mode])
        ts = times[mode]
        print(f"  {mode:22s}: {med:>10,.0f} values/s  ratio {med / base:.3f} "
              f"(range {min(rates[mode]):,.0f}-{max(rates[mode]):,.0f})  "
              f"{len(ts)} responses ({len(ts) / (args.repeats * (args.seconds + WARMUP)):.0f}/s), "
              f"{errors[mode]} errors; response p50 {pct(ts, 50) * 1e3:.1f} ms  "
              f"p99 {pct(ts, 99) * 1e3:.1f} ms  max {max(ts) * 1e3:.1f} ms  "
              f"(target max < 500 ms: {'met' if max(ts) < 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
