"""The accept loop survives running out of file descriptors (EMFILE), recovers, and logs the
episode as two lines (start; end with a count), not one line per retry."""

from __future__ import annotations

import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from mailstorm.ports import free_port

#: Small enough that a few dozen clients exhaust it, big enough for Python and trio to start.
FD_LIMIT = 48
#: Bound on every wait for the sink (start-up, recovery, a log line).
WAIT_LIMIT = 15.0
#: How long the test holds the descriptors exhausted: many times the accept loop's 0.1 s
#: retry, so that a line per retry would show. A bounded wait, not a threshold on speed.
HOLD = 1.0
#: The end-of-episode line: how it ended, how many accepts failed, for how long.
EPISODE_END = re.compile(
    r"accept: (recovered|stopped accepting) after (\d+) failed accepts? over ([\d.]+)s"
)


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _banner(port: int) -> bytes:
    """The banner of a short session; returns once the sink has closed it (so its descriptor
    is free again)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        data = sock.recv(512)
        sock.sendall(b"QUIT\r\n")
        while sock.recv(512):
            pass
        return data


def _is_episode_start(line: str) -> bool:
    return "Too many open files" in line and EPISODE_END.search(line) is None


class LineReader:
    """Collects a process's stderr lines in a thread, so the test can look at them while the
    process runs."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line)

    def wait_for(self, condition: Callable[[list[str]], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_LIMIT
        while not condition(list(self.lines)):
            assert time.monotonic() < deadline, f"no {what} in: {self.lines}"
            time.sleep(0.05)

    def join(self) -> list[str]:
        self._thread.join(WAIT_LIMIT)
        return list(self.lines)


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux RLIMIT_NOFILE behaviour")
def test_accept_loop_survives_emfile() -> None:
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-m", "mailstorm.sink", "--listen", f"127.0.0.1:{port}"],
        preexec_fn=_limit_fds, stderr=subprocess.PIPE, text=True,
    )
    assert sink.stderr is not None
    reader = LineReader(sink.stderr)
    clients: list[socket.socket] = []
    try:
        deadline = time.monotonic() + WAIT_LIMIT
        while True:
            try:
                assert _banner(port).startswith(b"220 ")
                break
            except OSError:
                assert time.monotonic() < deadline, "sink did not start"
                time.sleep(0.05)
        # More connections than the sink has descriptors: the kernel queues the rest.
        for _ in range(FD_LIMIT + 20):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        reader.wait_for(lambda lines: any(map(_is_episode_start, lines)), "EMFILE line")
        # Nothing frees a descriptor while the clients stay: one episode, logged once, however
        # often the accept loop retries meanwhile.
        time.sleep(HOLD)
        held = [line for line in reader.lines if _is_episode_start(line)]
        assert len(held) == 1, held
        assert sink.poll() is None, "the sink died when it ran out of descriptors"
        for client in clients:
            client.close()
        clients.clear()
        # Once descriptors are free again, new clients are served.
        deadline = time.monotonic() + WAIT_LIMIT
        while True:
            try:
                if _banner(port).startswith(b"220 "):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "sink did not recover"
            time.sleep(0.1)
        reader.wait_for(
            lambda lines: any("recovered after" in line for line in lines), "recovery line"
        )
        assert sink.poll() is None
    finally:
        for client in clients:
            client.close()
        sink.terminate()
        sink.wait(timeout=30)
    lines = reader.join()
    assert sink.returncode == 0, lines
    starts = [line for line in lines if _is_episode_start(line)]
    ends = [m for m in map(EPISODE_END.search, lines) if m is not None]
    # While the clients closed, descriptors came back one by one, so the sink may have run out
    # again briefly; each episode still has exactly one line at each end.
    assert len(starts) == len(ends) >= 1, lines
    how, failures, duration = ends[0].groups()
    assert how == "recovered"
    assert int(failures) >= 1
    assert float(duration) >= 0
