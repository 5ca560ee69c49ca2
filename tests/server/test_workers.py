"""``--workers N``: processes sharing a port, restarts after a crash, summed counters, signals."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for_output

PROCESS_TIMEOUT = 30.0




def _send(port: int, n: int) -> None:
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=PROCESS_TIMEOUT) as client:
            client.sendmail("a@example.com", ["b@example.com"], f"Subject: {i}\r\n\r\nx\r\n")


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_workers_share_the_port_survive_a_crash_and_stop_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "stderr.txt"
    maildir = tmp_path / "mail"
    with log.open("w") as stderr:
        sink = subprocess.Popen(
            [sys.executable, "-m", "mailstorm.sink", "--workers", "2", "--listen", "127.0.0.1:0",
             "--store", f"maildir:{maildir}", "--stats-interval", "0.2"],
            stderr=stderr, start_new_session=True,
        )
    try:
        port = int(wait_for_output(log, r"listening on 127\.0\.0\.1:(\d+)").group(1))
        pids = [int(p) for p in wait_for_output(log, r"2 workers serving \(pids (\d+), (\d+)\)")
                .groups()]
        _send(port, 40)
        names = os.listdir(maildir / "new")
        assert len(names) == 40
        # Queue ids begin with their worker's own random prefix: both workers took
        # connections (and no two workers drew the same prefix).
        queue_ids = re.findall(r"id ([0-9A-Z]{12}-\d+)", "".join(
            (maildir / "new" / name).read_text() for name in names))
        assert len(queue_ids) == 40
        assert len({q[:7] for q in queue_ids}) == 2

        # Counters travel in periodic reports: a killed worker keeps what it last reported.
        wait_for_output(log, r"messages 40, ")
        os.kill(pids[0], signal.SIGKILL)
        wait_for_output(log, rf"worker 0 \(pid {pids[0]}\) exited with status -9; restarting")
        _send(port, 10)
        wait_for_output(log, r"messages 50, .*worker restarts 1")

        sink.send_signal(signal.SIGTERM)
        assert sink.wait(timeout=PROCESS_TIMEOUT) == 0
    finally:
        if sink.poll() is None:
            os.killpg(sink.pid, signal.SIGKILL)
            sink.wait()
    text = log.read_text()
    assert "stopped: 2 workers: sessions 0 active / 50 total, messages 50" in text
    # The sink says where it listens and that it stopped once, not once per worker (the
    # restarted worker included).
    assert text.count("listening on") == 1, text
    assert text.count("stopped: ") == 1, text
    assert text.count("shutting down") == 1, text
    assert len(os.listdir(maildir / "new")) == 50
    # No worker outlives the supervisor.
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_workers_report_a_port_in_use_as_one_line(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "mailstorm.sink", "--workers", "2",
             "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "python -m mailstorm.sink: error: "
        f"cannot listen on 127.0.0.1:{port}: address already in use"
    )


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_stopping_while_a_worker_restarts_is_a_clean_stop(tmp_path: Path) -> None:
    """SIGTERM arriving while a crashed worker is being restarted (so the new one may not
    handle signals yet) still ends the supervisor cleanly, with exit status 0."""
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        sink = subprocess.Popen(
            [sys.executable, "-m", "mailstorm.sink", "--workers", "2", "--listen", "127.0.0.1:0"],
            stderr=stderr, start_new_session=True,
        )
    try:
        pids = [int(p) for p in wait_for_output(log, r"2 workers serving \(pids (\d+), (\d+)\)")
                .groups()]
        os.kill(pids[0], signal.SIGKILL)
        wait_for_output(log, rf"worker 0 \(pid {pids[0]}\) exited with status -9; restarting")
        sink.send_signal(signal.SIGTERM)  # the replacement is most likely still starting
        assert sink.wait(timeout=PROCESS_TIMEOUT) == 0, log.read_text()
    finally:
        if sink.poll() is None:
            os.killpg(sink.pid, signal.SIGKILL)
            sink.wait()
