"""The accept loop survives running out of file descriptors (EMFILE) and recovers."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time

import pytest

from mailstorm.ports import free_port

#: Small enough that a few dozen clients exhaust it, big enough for Python and trio to start.
FD_LIMIT = 48


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        data = sock.recv(512)
        sock.sendall(b"QUIT\r\n")
        return data


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux RLIMIT_NOFILE behaviour")
def test_accept_loop_survives_emfile() -> None:
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-m", "mailstorm.sink", "--listen", f"127.0.0.1:{port}"],
        preexec_fn=_limit_fds, stderr=subprocess.PIPE, text=True,
    )
    clients: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 15
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
        time.sleep(0.5)
        assert sink.poll() is None, "the sink died when it ran out of descriptors"
        for client in clients:
            client.close()
        clients.clear()
        # Once descriptors are free again, new clients are served.
        deadline = time.monotonic() + 15
        while True:
            try:
                if _banner(port).startswith(b"220 "):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "sink did not recover"
            time.sleep(0.1)
        assert sink.poll() is None
    finally:
        for client in clients:
            client.close()
        sink.terminate()
        _, err = sink.communicate(timeout=30)
    assert sink.returncode == 0, err
    assert "Too many open files" in err
