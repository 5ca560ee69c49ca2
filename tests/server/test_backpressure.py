"""Output back-pressure: a client that never reads costs the sink a few KiB, not the size of
everything it sent.

Found by an outside prober: 300 connections each sending a 64 KiB burst of ``HELP\\n``
without reading grew the sink's RSS by 659 MiB, and a fresh client waited seconds for its
banner, because every buffered command was answered into an unbounded output buffer. Now the
core stops parsing while its unsent replies are over ``max_unsent_output``, and the session
sends them (waiting, when the client does not read) before it reads or parses anything more.

The kernel holds output too: a sink session's socket has a small send buffer (a sink only
sends short replies), so the flood cannot park megabytes of replies in kernel memory either
(921 MiB of TCP memory before). The clients here shrink their receive buffers, so that what
the sink may buffer is what is measured.

The sink runs as its own process, so its RSS is what is measured, and the kernel's TCP memory
is read from /proc/net/sockstat (system-wide: the suite runs one test at a time). The bounds
are generous because the point is "bounded", not a number. ``--max-junk-commands 0`` lifts the
cap on HELP and its kind, which would otherwise end each flooding session after 100.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import trio
from conftest import TEST_TIMEOUT, SMTPClient

from mailstorm.ports import free_port

CONNECTIONS = 300
BURST = b"HELP\n" * (65536 // 5)
#: What the flood may add to the sink's resident memory (it added 659 MiB before; what it
#: adds now is mostly each session's last 64 KiB read, held until its replies are sent).
RSS_GROWTH_BOUND = 64 * 1024 * 1024
#: What the flood may add to the kernel's TCP memory (921 MiB before).
TCP_MEMORY_GROWTH_BOUND = 100 * 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def tcp_memory() -> int:
    """The kernel's memory for TCP buffers, system-wide, in octets."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * 4096
    raise AssertionError("no TCP line in /proc/net/sockstat")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


async def wait_until_idle(pid: int) -> None:
    """Until the sink stops using CPU (it has answered all it will answer), bounded."""
    with trio.move_on_after(TEST_TIMEOUT):
        last = cpu_seconds(pid)
        while True:
            await trio.sleep(0.5)
            now = cpu_seconds(pid)
            if now - last < 0.02:
                return
            last = now


async def test_a_never_reading_flood_costs_bounded_memory() -> None:
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-m", "mailstorm.sink", "--listen", f"127.0.0.1:{port}",
         "--max-junk-commands", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    socks: list[socket.socket] = []
    try:
        assert sink.stderr is not None
        assert "listening" in sink.stderr.readline().decode()
        await wait_until_idle(sink.pid)
        before, tcp_before = rss(sink.pid), tcp_memory()
        for _ in range(CONNECTIONS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(TEST_TIMEOUT)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            socks.append(sock)
        # Each client writes what the socket takes of its burst, and never reads.
        for sock in socks:
            with contextlib.suppress(BlockingIOError):
                sock.send(BURST)
        await wait_until_idle(sink.pid)
        grown = rss(sink.pid) - before
        assert grown < RSS_GROWTH_BOUND, f"RSS grew by {grown / 2**20:.0f} MiB"
        tcp_grown = tcp_memory() - tcp_before
        assert tcp_grown < TCP_MEMORY_GROWTH_BOUND, f"TCP memory grew {tcp_grown / 2**20:.0f} MiB"
        # And the sink still serves: a fresh client gets its banner and an answer.
        client = await SMTPClient.connect(("127.0.0.1", port))
        assert (await client.reply()).code == 220
        assert (await client.cmd("NOOP")).code == 250
        await client.aclose()
    finally:
        for sock in socks:
            sock.close()
        sink.terminate()
        sink.wait(timeout=TEST_TIMEOUT)
