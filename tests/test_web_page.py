"""The monitoring page at `/`: served with a policy that forbids external loads, and run in a real browser.

The browser tests drive headless Chromium from Debian's packages (`chromium`, `chromium-driver`) with
selenium against a real service (paced simulated source, disk queue, SQLite behind a fault-injecting
sink) and skip, with the reason, where the browser, its driver or selenium is missing.
Screenshots go to tmp_path, and also to the folder TAGWRITER_WEB_SCREENSHOTS names (CI artifacts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from procs import free_port
from waits import wait_until

from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig, MetricsConfig, WriterConfig
from tagwriter.endpoint import MetricsServer
from tagwriter.pipeline import Pipeline
from tagwriter.service import Service
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.sources.simulate import SimulatedSource, Simulator

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service as DriverService
except ImportError:  # the browser tests skip; the others run
    webdriver = None  # type: ignore[assignment]

PAGE = files("tagwriter") / "web" / "index.html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
RATE = 5_000  # values/s: 5 groups x 100 tags every 0.1 s
# Figures the page shows for the same-named JSON field: counters only rise between two reads;
# gauges: (scale of the shown number, how far a gauge jumps between reads whatever the two reads say:
# the buffer and the disk queue hold a few hundred values, more or less, from one moment to the next).
COUNTERS = ("submitted", "written", "duplicates", "spooled", "quarantined", "dropped")
GAUGES = {"buffer_utilization_pct": (1, 1.0), "rate_in_per_s": (1, 0), "rate_out_per_s": (1, 0),
          "avg_write_latency_5m_s": (1e3, 0), "latency_p50_s": (1e3, 0), "latency_p99_s": (1e3, 0),
          "queue_values": (1, 1_000)}


def config(tmp_path: Path, port: int = 0) -> Config:
    return Config(
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'tags.db'}"),
        backup=BackupConfig(directory=str(tmp_path / "backup"),
                            quarantine_directory=str(tmp_path / "backup" / "quarantine"),
                            replay_rate=4_000.0),  # a drain that lasts seconds: the page sees it
        buffer=BufferConfig(durability="disk", directory=str(tmp_path / "queue")),
        writer=WriterConfig(batch_size=500, flush_interval=0.05, retry_delays=[0.01, 0.01],
                            probe_interval=0.05, probe_max_interval=0.1, shutdown_timeout=5.0),
        metrics=MetricsConfig(port=port),
    )


def get(url: str, method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as resp:
        return resp.status, resp.read(), dict(resp.headers)


def read_json(url: str) -> dict[str, Any]:
    return dict(json.loads(get(url + "/api/buffer/metrics")[1]))


# -- without a browser ---------------------------------------------------------------------------


def test_root_serves_the_page_with_a_policy_that_forbids_external_loads(tmp_path: Path) -> None:
    with Pipeline(dataclasses.replace(config(tmp_path), buffer=BufferConfig())) as pipeline:
        server = MetricsServer(pipeline, port=0).start()
        try:
            for path in ("/", "/index.html", "/?from=bookmark"):
                status, body, headers = get(server.url + path)
                assert (status, headers["Content-Type"]) == (200, "text/html; charset=utf-8"), path
                assert body == PAGE.read_bytes()
                policy = dict(d.strip().split(" ", 1) for d in headers["Content-Security-Policy"].split(";"))
                assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
                assert not any(re.search(r"\*|https?:|//", v) for v in policy.values()), policy
            status, body, headers = get(server.url + "/", method="HEAD")
            assert status == 200 and body == b"" and "Content-Security-Policy" in headers
        finally:
            server.stop(1.0)


def test_the_page_is_one_readable_file_that_names_nothing_outside() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 400
    assert all(v.startswith("data:") for v in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text))
    # The one URL in it is the SVG namespace, a name and not a load.
    assert set(re.findall(r"https?://[^\s\"'`)]+", text)) == {"http://www.w3.org/2000/svg"}
    assert "@import" not in text and "url(" not in text
    assert re.findall(r"fetch\((\w+)", text) == ["SOURCE"] and 'SOURCE = "api/buffer/metrics"' in text


# -- in a browser --------------------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Any]:
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install selenium)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium or chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: containers and root (CI) have no user namespaces for Chromium's sandbox.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,760"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=DriverService(executable_path=CHROMEDRIVER))
    except WebDriverException as exc:
        pytest.skip(f"chromium does not start here: {exc.msg}")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[str, MemorySink]]:
    """A running service at RATE values/s; (its endpoint's URL, the sink to inject faults in)."""
    port = free_port()
    sink = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    svc = Service(config(tmp_path, port), SimulatedSource(Simulator(5, 100, 0.1)), sink=sink).start()
    try:
        yield f"http://127.0.0.1:{port}", sink
    finally:
        svc.stop()


def figures(driver: Any) -> dict[str, tuple[str, Any]]:
    """Every figure on the page, {field: (text shown, raw value)}, read in one go: from one refresh."""
    found = driver.execute_script(
        "return [...document.querySelectorAll('[id^=v-]')].map(e => [e.id.slice(2), e.textContent, e.dataset.value])")
    return {field: (text, json.loads(raw or "null")) for field, text, raw in found}


def refreshes(driver: Any) -> int:
    return int(driver.find_element("tag name", "body").get_attribute("data-refreshes") or 0)


def chart_points(driver: Any) -> list[int]:
    return [int(p) for p in driver.execute_script(
        "return [...document.querySelectorAll('#charts svg')].map(s => s.dataset.points)")]


def page_text(driver: Any, element_id: str) -> str:
    return str(driver.find_element("id", element_id).text)


def shown_number(text: str) -> tuple[float, float]:
    """The number in a figure's text ("1,234 /s", "26.3 ms", "1.2 %") and half its last digit."""
    digits = text.split()[0].replace(",", "")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return float(digits), 0.5 * 10 ** -decimals


def save_screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    height = driver.execute_script(
        "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight + 24")
    driver.set_window_size(1280, height)  # the whole page in one picture
    assert driver.save_screenshot(str(path)), path
    if folder := os.environ.get("TAGWRITER_WEB_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / name)
    return path


def severe_console_entries(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.mark.slow
def test_the_page_charts_a_run_and_shows_the_json_figures(
    browser: Any, service: tuple[str, MemorySink], tmp_path: Path
) -> None:
    url, _ = service
    browser.get(url + "/")
    wait_until(lambda: refreshes(browser) >= 6 and min(chart_points(browser)[:5]) >= 5,
               "six refreshes, five samples drawn on the buffer, rate and latency charts", 20)
    wait_until(lambda: figures(browser)["latency_p99_s"][1], "an end-to-end latency on the page", 10)

    before = read_json(url)
    seen = refreshes(browser)
    wait_until(lambda: refreshes(browser) > seen, "a refresh after the first JSON read", 5)
    shown = figures(browser)  # fetched after `before`, read before `after`
    after = read_json(url)

    assert shown["state"] == ("writing", "writing") and before["state"] == after["state"] == "writing"
    for field in COUNTERS:
        text, value = shown[field]
        assert before[field] <= value <= after[field], field
        assert text == f"{value:,}", field
    for field, (scale, jumps) in GAUGES.items():
        text, value = shown[field]
        low, high = sorted((before[field], after[field]))
        slack = (high - low) + 0.05 * high + jumps  # what moves between two reads, and a little more
        assert low - slack <= value <= high + slack, (field, before[field], value, after[field])
        number, rounding = shown_number(text)
        assert abs(number - value * scale) <= rounding + 1e-9, (field, text, value)
    assert shown["rate_in_per_s"][1] > 0.5 * RATE
    assert shown["drain_eta_s"] == ("–", None) and before["drain_eta_s"] is None  # nothing to drain
    assert "no answer" not in page_text(browser, "status")
    assert re.fullmatch(r"for \d+ s · last commit \d+ s ago", page_text(browser, "since"))
    assert severe_console_entries(browser) == []
    save_screenshot(browser, tmp_path, "web_page.png")


@pytest.mark.slow
def test_the_page_refuses_to_call_another_origin(browser: Any, service: tuple[str, MemorySink]) -> None:
    url, _ = service
    hits: list[str] = []

    class Count(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()

    other = ThreadingHTTPServer(("127.0.0.1", 0), Count)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        browser.get(url + "/")
        wait_until(lambda: refreshes(browser) >= 1, "the page's first refresh", 10)
        attempt = "fetch(arguments[0]).then(() => arguments[1]('loaded'), e => arguments[1]('refused: ' + e))"
        assert browser.execute_async_script(attempt, "api/buffer/metrics") == "loaded"  # the page's own source
        outcome = browser.execute_async_script(attempt, f"http://127.0.0.1:{other.server_port}/beacon")
        assert outcome.startswith("refused"), outcome
        assert hits == []
        assert any("Content Security Policy" in m for m in severe_console_entries(browser))
    finally:
        other.shutdown()
        other.server_close()


@pytest.mark.slow
def test_the_page_shows_an_outage_its_error_and_the_drain_after_it(
    browser: Any, service: tuple[str, MemorySink], tmp_path: Path
) -> None:
    url, sink = service
    browser.get(url + "/")
    wait_until(lambda: figures(browser)["state"][1] == "writing", "the page to show writing", 20)
    sink.go_down()
    wait_until(lambda: figures(browser)["state"][1] == "outage", "the page to show the outage", 10)
    wait_until(lambda: "database down (injected)" in page_text(browser, "errors"), "the error in Last errors", 5)
    assert "outage" in page_text(browser, "errors")  # the state the error was seen in
    seen = refreshes(browser)
    wait_until(lambda: refreshes(browser) >= seen + 3, "three refreshes in the outage (a backlog builds)", 10)
    sink.come_up()

    wait_until(lambda: figures(browser)["state"][1] == "writing", "the page to show the recovery", 10)
    wait_until(lambda: (figures(browser)["backlog_rows"][1] or 0) > 0, "the spool backlog on the page", 15)
    wait_until(lambda: chart_points(browser)[5] >= 1, "a drain ETA drawn on its chart", 20)
    wait_until(lambda: figures(browser)["backlog_rows"][1] == 0, "the backlog drained on the page", 30)
    transitions = page_text(browser, "transitions")
    assert "→ outage" in transitions and "outage → writing" in transitions, transitions
    assert "outage" in page_text(browser, "state-keys")
    final = read_json(url)
    assert final["outages"] == 1 and figures(browser)["outages"][1] == 1
    assert severe_console_entries(browser) == []
    save_screenshot(browser, tmp_path, "web_page_outage.png")


@pytest.mark.slow
def test_the_page_says_when_the_endpoint_stops_answering(browser: Any, tmp_path: Path) -> None:
    with Pipeline(dataclasses.replace(config(tmp_path), buffer=BufferConfig())) as pipeline:
        server = MetricsServer(pipeline, port=0).start()
        try:
            browser.get(server.url + "/")
            wait_until(lambda: figures(browser)["state"][1] == "writing", "the page to show writing", 10)
            shown = figures(browser)  # nothing submitted: no latency to show, and no "0.00 ms"
            assert shown["latency_p99_s"] == shown["avg_write_latency_5m_s"] == ("–", None)
            assert "no commit yet" in page_text(browser, "since")
        finally:
            server.stop(1.0)
        wait_until(lambda: page_text(browser, "status").startswith("no answer since"), "'no answer' on the page", 10)
        assert figures(browser)["state"] == ("no answer", None)
        assert "stale" in str(browser.find_element("tag name", "main").get_attribute("class"))  # figures dimmed
        assert figures(browser)["submitted"][0] == "0"  # the last figures stay readable
        assert "no answer" in page_text(browser, "state-keys")
        assert "writing → no answer" in page_text(browser, "transitions")
