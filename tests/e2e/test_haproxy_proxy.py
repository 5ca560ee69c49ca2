"""The sink behind a real HAProxy (Debian package ``haproxy``) with ``send-proxy`` and
``send-proxy-v2``: the client connects from 127.0.0.2, HAProxy from 127.0.0.1, and the stored
message's Received header must name 127.0.0.2.

HAProxy runs in the foreground (``-db``) as a child of the test, in TCP mode, on free loopback
ports, and is killed when the test ends. Skipped, with the reason, when it is not installed.
"""

from __future__ import annotations

import errno
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailstorm.ports import free_port
from mailstorm.sink import SinkThread, read_maildir

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists(),
        reason="haproxy is not installed (Debian package 'haproxy')",
    ),
]

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
#: Bound on waiting for a process to listen, and on every client operation.
WAIT = 15.0
#: The client's own address, distinct from the 127.0.0.1 HAProxy connects from.
CLIENT_IP = "127.0.0.2"

HAPROXY_CONFIG = """\
global
    maxconn 64
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind 127.0.0.1:{front}
    default_backend sink
backend sink
    server s1 127.0.0.1:{sink} {send_proxy}
"""

StartHAProxy = Callable[[int, str], int]


def wait_listening(
    port: int, process: subprocess.Popen[bytes], what: str, *, connect: bool = True
) -> None:
    """Until ``port`` on 127.0.0.1 is taken (``connect``: accepts a connection); fails if
    ``process`` exits or WAIT passes. HAProxy is not probed by connecting: a probe would
    reach the sink as a connection of its own."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            pytest.fail(f"{what} exited with {process.returncode}: {output}")
        if _accepts(port) if connect else _taken(port):
            return
        time.sleep(0.05)
    pytest.fail(f"{what} did not listen on port {port} within {WAIT}s")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _taken(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(WAIT)


@pytest.fixture
def start_haproxy(tmp_path: Path) -> Iterator[StartHAProxy]:
    """Start HAProxy in front of a sink port; returns the port clients connect to."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(sink_port: int, send_proxy: str) -> int:
        front = free_port()
        config = tmp_path / f"haproxy-{len(processes)}.cfg"
        config.write_text(HAPROXY_CONFIG.format(front=front, sink=sink_port, send_proxy=send_proxy))
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        wait_listening(front, process, "haproxy", connect=False)
        return front

    yield start
    for process in processes:
        stop(process)


def send_one(port: int, subject: str) -> None:
    """One message with smtplib, from CLIENT_IP, through HAProxy's ``port``."""
    message = EmailMessage()
    message["From"] = "alice@example.test"
    message["To"] = "bob@example.test"
    message["Subject"] = subject
    message.set_content("through haproxy\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT, source_address=(CLIENT_IP, 0)) as client:
        client.ehlo("client.test")
        client.send_message(message)


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
@pytest.mark.smtp_sink(proxy_protocol=True)
def test_plugin_sink_behind_haproxy_records_the_client(
    smtp_sink: SinkThread, start_haproxy: StartHAProxy, send_proxy: str
) -> None:
    front = start_haproxy(smtp_sink.port, send_proxy)
    send_one(front, send_proxy)
    records = smtp_sink.wait_for(1, timeout=WAIT)
    assert [r.message["Subject"] for r in records] == [send_proxy]
    assert records[0].client_address == CLIENT_IP
    assert f"[{CLIENT_IP}]" in records[0].trace.decode()
    stats = smtp_sink.stats
    assert stats.proxy_accepted == 1
    assert stats.proxy_refused() == 0


@pytest.mark.smtp_sink(proxy_protocol=True)
def test_haproxy_health_checks_are_accepted(
    smtp_sink: SinkThread, start_haproxy: StartHAProxy
) -> None:
    # check-send-proxy: HAProxy's own checks open with a header too (v2: the LOCAL command).
    start_haproxy(smtp_sink.port, "send-proxy-v2 check check-send-proxy inter 50ms")
    stats = smtp_sink.stats
    deadline = time.monotonic() + WAIT
    while stats.proxy_accepted < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats.proxy_accepted >= 2
    assert stats.proxy_refused() == 0


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_sink_command_behind_haproxy(
    tmp_path: Path, start_haproxy: StartHAProxy, send_proxy: str
) -> None:
    maildir = tmp_path / "mail"
    sink_port = free_port()
    sink = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailstorm",
            "sink",
            "--proxy-protocol",
            "--listen",
            f"127.0.0.1:{sink_port}",
            "--store",
            f"maildir:{maildir}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )
    try:
        wait_listening(sink_port, sink, "mailstorm sink")
        front = start_haproxy(sink_port, send_proxy)
        send_one(front, send_proxy)
    finally:
        stop(sink)
    [record] = read_maildir(maildir)
    assert record.client_address == CLIENT_IP
    assert record.message["Subject"] == send_proxy
