"""``mailstorm load --log-format json``: the generator's own lines on stderr (errors, warnings,
progress off a terminal) are JSON objects, one per line; text keeps the plain lines."""

from __future__ import annotations

import json
import subprocess
import sys

from mailstorm.ports import free_port

TIMEOUT = 60.0


def _load(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailstorm", "load", *args],
        capture_output=True, text=True, timeout=TIMEOUT,
    )


def test_an_unreachable_target_is_one_json_line() -> None:
    port = free_port()  # nobody listens there
    result = _load(f"127.0.0.1:{port}", "--log-format", "json", "--messages", "1")
    assert result.returncode == 4
    (line,) = result.stderr.splitlines()
    entry = json.loads(line)
    assert entry["event"] == "target_unreachable"
    assert entry["level"] == "error"
    assert entry["target"] == f"smtp://127.0.0.1:{port}"
    assert f"cannot connect to 127.0.0.1:{port}" in entry["message"]


def test_text_keeps_the_plain_line() -> None:
    port = free_port()
    result = _load(f"127.0.0.1:{port}", "--messages", "1")
    assert result.returncode == 4
    assert result.stderr == (
        f"mailstorm load: cannot connect to 127.0.0.1:{port}: connection refused\n"
    )


def test_a_bad_log_level_is_a_usage_error() -> None:
    result = _load("127.0.0.1:2525", "--log-level", "loud")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--log-level" in result.stderr


def test_a_run_logs_progress_as_json() -> None:
    sink_port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-m", "mailstorm", "sink", "--listen", f"127.0.0.1:{sink_port}",
         "--log-format", "json"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert sink.stderr is not None
        assert json.loads(sink.stderr.readline())["event"] == "listening"
        result = _load(f"127.0.0.1:{sink_port}", "--log-format", "json", "--messages", "200",
                       "--sessions", "2", "--progress-interval", "0.01", "--rcpts", "1")
    finally:
        sink.terminate()
        sink.wait(timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert entries, "no progress line"
    assert {entry["event"] for entry in entries} <= {"progress", "ephemeral_ports"}
    assert all(entry["logger"] == "mailstorm.load" for entry in entries)
