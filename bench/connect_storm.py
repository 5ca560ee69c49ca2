"""Many SMTP clients connecting at once: time-to-banner percentiles, and idle sessions.

A small asyncio client on raw non-blocking sockets (no streams, no SMTP library) so that the
client costs as little CPU as possible. Each client connects and reads the server's greeting;
its time-to-banner runs from its own connect() to the arrival of the end of the ``220`` line.
Connections stay open until every client is done, so the server really holds N sessions at
once.

The arrival time is the kernel's receive timestamp (``SO_TIMESTAMPNS``), not the moment this
client got round to reading the socket: with thousands of sockets in one Python process the
client's own backlog would otherwise dominate (measured here: p50 about 1 s for 5,000 clients
even against Postfix smtp-sink). Where the kernel cannot stamp packets the client's clock is
used instead, and the result says so.

Stand-alone use::

    python -m bench.connect_storm 127.0.0.1:2525 --clients 5000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import math
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass

__all__ = ["StormResult", "close_all", "connect_storm", "open_greeted", "percentile"]

#: Enough for any greeting we expect; a longer one is read in several receives.
_RECEIVE = 4096
#: Linux's SO_TIMESTAMPNS (== SCM_TIMESTAMPNS), not exported by the socket module; the
#: control message carries a struct timespec of CLOCK_REALTIME.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@ll")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


class _GreetingError(Exception):
    """The server answered the connection with something other than a 220 greeting."""


@dataclass
class StormResult:
    """Time-to-banner of ``clients`` simultaneous connections (milliseconds)."""

    clients: int
    greeted: int
    failed: int
    errors: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    #: From the first connect() to the last greeting (or failure).
    wall_s: float


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _greeting_complete(buffer: bytes) -> bool:
    """True once ``buffer`` holds the last line of a reply (``NNN `` then CRLF)."""
    return any(len(line) < 4 or line[3:4] == b" " for line in buffer.split(b"\r\n")[:-1])


def _check_greeting(buffer: bytes) -> None:
    if not buffer.startswith(b"220"):
        code = buffer[:3].decode("ascii", "replace") or "nothing"
        raise _GreetingError(f"reply {code}")


def _stamp_packets(sock: socket.socket) -> bool:
    """Ask the kernel to timestamp received data; False where it cannot."""
    if sys.platform != "linux":
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def _kernel_time_ns(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The receive timestamp in a recvmsg() control message, in ns of CLOCK_REALTIME."""
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(payload) >= 16:
            seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
            return seconds * 1_000_000_000 + nanoseconds
    return None


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until ``sock`` has data (or EOF) to read."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _read_greeting(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> int:
    """Read the whole greeting; return when its last byte arrived (ns, CLOCK_REALTIME)."""
    buffer = b""
    arrived = time.time_ns()
    while not _greeting_complete(buffer):
        try:
            data, ancdata, _, _ = sock.recvmsg(_RECEIVE, _ANCILLARY)
        except BlockingIOError:
            await _readable(loop, sock)
            continue
        if not data:
            raise _GreetingError("closed before the greeting")
        arrived = _kernel_time_ns(ancdata) or time.time_ns()
        buffer += data
    _check_greeting(buffer)
    return arrived


def _error_name(exc: BaseException) -> str:
    """A short, countable name for why a client was not greeted."""
    if isinstance(exc, _GreetingError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


async def _greet(
    host: str, port: int, timeout: float
) -> tuple[socket.socket | None, float | None, str | None]:
    """Connect and read the greeting: (open socket, ms to banner, None) or (None, None, why)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    _stamp_packets(sock)
    start = time.time_ns()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            arrived = await _read_greeting(loop, sock)
    except (OSError, _GreetingError) as exc:
        sock.close()
        return None, None, _error_name(exc)
    return sock, max(arrived - start, 0) / 1e6, None


async def open_greeted(
    host: str, port: int, n: int, *, batch: int | None = None, timeout: float = 30.0
) -> tuple[list[socket.socket], list[float], dict[str, int]]:
    """Open ``n`` connections that have read the greeting; they stay open.

    With ``batch`` None all ``n`` start at once; otherwise at most ``batch`` are connecting
    at any time. Returns the open sockets, each one's time-to-banner in ms, and error counts.
    """
    limit = asyncio.Semaphore(batch or n or 1)

    async def one() -> tuple[socket.socket | None, float | None, str | None]:
        async with limit:
            return await _greet(host, port, timeout)

    results = await asyncio.gather(*(one() for _ in range(n)))
    socks = [sock for sock, _, _ in results if sock is not None]
    times = [ms for _, ms, _ in results if ms is not None]
    errors: dict[str, int] = {}
    for _, _, why in results:
        if why is not None:
            errors[why] = errors.get(why, 0) + 1
    return socks, times, errors


#: SO_LINGER with a zero timeout: close() sends RST and leaves no TIME_WAIT behind, so
#: tens of thousands of bench connections do not use up the ephemeral ports.
_ABORT = struct.pack("ii", 1, 0)


def close_all(socks: list[socket.socket]) -> None:
    """Abort every connection (the server sees a reset) and close the sockets."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
        sock.close()


async def _storm(host: str, port: int, clients: int, timeout: float) -> StormResult:
    start = time.perf_counter()
    socks, times, errors = await open_greeted(host, port, clients, timeout=timeout)
    wall = time.perf_counter() - start
    close_all(socks)
    return StormResult(
        clients=clients,
        greeted=len(times),
        failed=clients - len(times),
        errors=errors,
        p50_ms=_round(percentile(times, 50)),
        p99_ms=_round(percentile(times, 99)),
        max_ms=_round(max(times, default=None)),
        wall_s=round(wall, 3),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def connect_storm(host: str, port: int, clients: int, *, timeout: float = 30.0) -> StormResult:
    """Connect ``clients`` clients at once and report their time-to-banner."""
    return asyncio.run(_storm(host, port, clients, timeout))


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.connect_storm HOST:PORT``: one storm, printed as JSON."""
    from .measure import raise_nofile

    parser = argparse.ArgumentParser(prog="python -m bench.connect_storm", description=__doc__)
    parser.add_argument("target", help="HOST:PORT (loopback only)")
    parser.add_argument("--clients", "-n", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=30.0, help="per client, seconds")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    raise_nofile(args.clients + 256)
    result = connect_storm(host.strip("[]"), int(port), args.clients, timeout=args.timeout)
    print(json.dumps(asdict(result), indent=2))
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
