"""``mailstorm load --metrics-listen``: the live counters of a real run against a real sink,
scraped over HTTP while the run goes and parsed with prometheus-client's own parser.

To scrape a finished run deterministically, the sink holds its answer to QUIT (``--delay
'QUIT:...'``): every message is answered by then, and the run (and its endpoint) waits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import wait_for_output
from prometheus_client.parser import text_string_to_metric_families

PROCESS_TIMEOUT = 30.0

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]




@contextmanager
def _process(log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "mailstorm", *args],
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """``/metrics`` parsed: sample name -> {sorted labels: value}, and family name -> type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    kinds: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        kinds[family.name] = family.type
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples, kinds


@contextmanager
def _sink(tmp_path: Path, *args: str, quit_delay: str = "3s") -> Iterator[tuple[int, int]]:
    """A sink process whose QUIT answer waits; its SMTP and metrics ports."""
    log = tmp_path / "sink.txt"
    with _process(log, "sink", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                  "--delay", f"QUIT:{quit_delay}", *args) as sink:
        smtp = int(wait_for_output(log, r"listening on 127\.0\.0\.1:(\d+)").group(1))
        metrics = int(wait_for_output(log, r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1))
        yield smtp, metrics
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(timeout=PROCESS_TIMEOUT) == 0


def test_a_run_exports_live_counters_that_match_the_sink(tmp_path: Path) -> None:
    with _sink(tmp_path, "--fault", "EOD:452:every=5") as (smtp, sink_metrics):
        log = tmp_path / "load.txt"
        with _process(log, "load", f"127.0.0.1:{smtp}", "--messages", "10", "--sessions", "1",
                      "--metrics-listen", "127.0.0.1:0", "-q") as load:
            port = int(wait_for_output(log, r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1))
            seen: list[float] = []
            deadline = time.monotonic() + PROCESS_TIMEOUT
            while True:  # until every message is answered (the sink then holds the QUIT)
                m, kinds = scrape(port)
                done = m["mailstorm_load_messages_delivered_total"][()]
                seen.append(done)
                if done + m["mailstorm_load_messages_failed_total"][()] == 10:
                    break
                assert time.monotonic() < deadline, m
                time.sleep(0.05)
            assert seen == sorted(seen), "a counter never goes back"
            sink, _ = scrape(sink_metrics)
            # Exact: what the generator counts as delivered is what the sink stored.
            assert m["mailstorm_load_messages_delivered_total"][()] == 8
            assert sink["mailstorm_sink_messages_stored_total"][()] == 8
            assert m["mailstorm_load_messages_failed_total"][()] == 2
            assert m["mailstorm_load_error_replies_total"] == {(("code", "452"),): 2}
            assert sink["mailstorm_sink_replies_total"][(("code", "452"),)] == 2
            assert m["mailstorm_load_errors_total"][(("kind", "4xx"),)] == 2
            assert m["mailstorm_load_messages_attempted_total"][()] == 10
            assert m["mailstorm_load_connections_total"][()] == 1
            assert m["mailstorm_load_sessions_open"][()] == 1  # waiting for the QUIT's answer
            assert m["mailstorm_load_message_bytes_total"][()] == (
                sink["mailstorm_sink_message_bytes_total"][()])
            # One latency histogram per phase (of the replies the plan wanted).
            eod = (("le", "+Inf"), ("phase", "eod"))
            assert m["mailstorm_load_phase_seconds_bucket"][eod] == 8
            assert m["mailstorm_load_phase_seconds_count"][(("phase", "connect"),)] == 1
            assert m["mailstorm_load_phase_seconds_count"][(("phase", "message"),)] == 8
            assert kinds["mailstorm_load_phase_seconds"] == "histogram"
            assert kinds["mailstorm_load_messages_delivered"] == "counter"
            assert kinds["mailstorm_load_sessions_open"] == "gauge"
            assert load.wait(timeout=PROCESS_TIMEOUT) == 0


def test_procs_export_the_sum_over_worker_processes(tmp_path: Path) -> None:
    # The workers tell the parent once a second: the sink holds QUIT long enough for that.
    with _sink(tmp_path, quit_delay="6s") as (smtp, sink_metrics):
        log = tmp_path / "load.txt"
        with _process(log, "load", f"127.0.0.1:{smtp}", "--messages", "20", "--sessions", "2",
                      "--procs", "2", "--metrics-listen", "127.0.0.1:0", "-q") as load:
            port = int(wait_for_output(log, r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1))
            deadline = time.monotonic() + PROCESS_TIMEOUT
            while True:
                m, _ = scrape(port)
                if m["mailstorm_load_messages_delivered_total"][()] == 20:
                    break
                assert time.monotonic() < deadline, m
                time.sleep(0.1)
            sink, _ = scrape(sink_metrics)
            assert sink["mailstorm_sink_messages_stored_total"][()] == 20
            assert m["mailstorm_load_messages_attempted_total"][()] == 20
            assert m["mailstorm_load_connections_total"][()] == 2
            assert m["mailstorm_load_phase_seconds_count"][(("phase", "eod"),)] == 20
            assert load.wait(timeout=PROCESS_TIMEOUT) == 0


def _load(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailstorm", "load", *args, "--messages", "1", "-q"],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
    )


def test_a_bad_metrics_address_is_one_line() -> None:
    result = _load("127.0.0.1:25", "--metrics-listen", "nonsense")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "bad metrics address" in result.stderr


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    with _sink(tmp_path) as (smtp, _), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _load(f"127.0.0.1:{smtp}", "--metrics-listen", f"127.0.0.1:{port}")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"mailstorm load: error: cannot serve metrics on 127.0.0.1:{port}: "
            "address already in use"
        ]


@pytest.mark.parametrize("target", ["sink", "load"])
def test_help_explains_the_option(target: str) -> None:
    result = subprocess.run([sys.executable, "-m", "mailstorm", target, "--help"],
                            capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert "--metrics-listen HOST:PORT" in result.stdout
    assert "/metrics" in result.stdout
