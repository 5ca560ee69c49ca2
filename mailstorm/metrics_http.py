"""The ``/metrics`` endpoint that the sink and the load generator share (``--metrics-listen``).

What it serves is prometheus-client's text exposition of one ``CollectorRegistry``
(``generate_latest``); this module only moves it over HTTP.

Why a trio task and not prometheus-client's ``start_http_server`` (a daemon thread): the task
belongs to the nursery of the program that serves, so it starts before the program says it is
ready (a port in use is a start-up error, port 0 gives a real port to print), stops with it,
and reads the counters on the event loop that writes them, so a scrape never sees a half-made
update and needs no lock. A scrape is cheap (collectors read plain counters), so serving it on
the event loop delays the sessions by about as much as one SMTP command.

What a scraper can cost is bounded: one request of at most ``MAX_REQUEST`` octets, read within
``REQUEST_TIMEOUT`` seconds, at most ``MAX_SCRAPERS`` connections at once (more are closed at
once), one answer, then the connection is closed.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import trio

from mailstorm.cliutil import split_host_port, value_type
from mailstorm.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "MetricsAddress",
    "add_metrics_arguments",
    "bind_metrics_socket",
    "parse_metrics_address",
    "serve_metrics",
]

log = logging.getLogger("mailstorm.metrics")

#: The most a scraper may send: a request line and headers (Prometheus sends well under 1 KiB).
MAX_REQUEST = 8192
#: Seconds a scraper has to send its request and read the answer.
REQUEST_TIMEOUT = 10.0
#: Connections served at once; more are closed without an answer.
MAX_SCRAPERS = 16
#: accept() errors that mean "out of a resource for now", and how long to back off then.
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_BACKOFF = 0.1


#: What ``--metrics-listen`` serves, per program.
_OPTION_HELP = {
    "sink": "serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port, "
    "said at start-up); with --workers the supervisor serves the sums over all workers "
    "(default off)",
    "load": "serve the run's live counters and latencies as Prometheus metrics at "
    "http://HOST:PORT/metrics while it runs (port 0: any free port, said at start-up; "
    "default off)",
}


def add_metrics_arguments(
    parser: argparse.ArgumentParser, program: Literal["sink", "load"]
) -> None:
    """The ``metrics`` option group of ``mailstorm sink`` or ``mailstorm load``.

    It lives here, not beside the collectors, so that a run without metrics never imports
    prometheus-client (about 50 ms of start-up).
    """
    group = parser.add_argument_group("metrics")
    group.add_argument(
        "--metrics-listen",
        type=value_type(parse_metrics_address),
        metavar="HOST:PORT",
        help=_OPTION_HELP[program],
    )


@dataclass(frozen=True, slots=True)
class MetricsAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_metrics_address(text: str) -> MetricsAddress:
    """``HOST:PORT`` or ``[IPv6]:PORT`` (port 0: any free port); ValueError says what is wrong."""
    try:
        host, port_text = split_host_port(text.strip())
    except ValueError as exc:
        raise ValueError(f"bad metrics address {text!r}: {exc}") from None
    if port_text is None or not host:
        raise ValueError(f"bad metrics address {text!r}: expected HOST:PORT or [IPv6]:PORT")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"bad metrics address {text!r}: port must be 0 to 65535")
    return MetricsAddress(host, int(port_text))


def bind_metrics_socket(address: MetricsAddress) -> socket.socket:
    """A listening socket for ``address``; ConfigError with one line if it cannot be had."""
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"cannot serve metrics on {address}: {reason or exc}") from None
    return sock


def bound_address(sock: socket.socket) -> MetricsAddress:
    """Where ``sock`` listens (the real port when 0 was asked for)."""
    name = sock.getsockname()
    return MetricsAddress(str(name[0]), int(name[1]))


async def serve_metrics(
    sock: socket.socket,
    registry: CollectorRegistry,
    *,
    task_status: trio.TaskStatus[MetricsAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` from ``registry`` on the listening ``sock`` until cancelled.

    Reports the bound address when it accepts; closes ``sock`` when it returns.
    """
    address = bound_address(sock)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    scrapers = trio.Semaphore(MAX_SCRAPERS)
    async with listener, trio.open_nursery() as nursery:
        task_status.started(address)
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                # Out of file descriptors (a sink under a connect storm): the scrape can
                # wait, the sink must not fail for it.
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            try:
                scrapers.acquire_nowait()
            except trio.WouldBlock:
                await trio.aclose_forcefully(stream)
                continue
            nursery.start_soon(_answer, stream, registry, scrapers)


async def _answer(
    stream: trio.SocketStream, registry: CollectorRegistry, scrapers: trio.Semaphore
) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            request = await _read_request(stream)
            if request is not None:
                await stream.send_all(_response(request, registry))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("metrics scrape failed: %r", exc)
    finally:
        scrapers.release()
        await trio.aclose_forcefully(stream)


async def _read_request(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers, or None (too long, or the scraper went away)."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) >= MAX_REQUEST:
            await stream.send_all(_status(431, "Request Header Fields Too Large"))
            return None
        chunk = await stream.receive_some(MAX_REQUEST - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _response(request: bytes, registry: CollectorRegistry) -> bytes:
    """The answer to one request: the exposition for ``GET /metrics``, else an error.

    The format follows the scraper's Accept header, as prometheus-client's own server does
    (Prometheus asks for OpenMetrics; curl gets the classic text format).
    """
    from prometheus_client.exposition import choose_encoder

    head_line, _, headers = request.partition(b"\n")
    parts = head_line.split()
    if len(parts) != 3:
        return _status(400, "Bad Request")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _status(405, "Method Not Allowed", b"Allow: GET, HEAD\r\n")
    if target != b"/metrics":
        return _status(404, "Not Found", body=b"metrics are at /metrics\n")
    accept = ""
    for line in headers.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encoder, content_type = choose_encoder(accept)
    body = encoder(registry)
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if method == b"HEAD" else head + body


def _status(code: int, reason: str, headers: bytes = b"", body: bytes = b"") -> bytes:
    body = body or f"{code} {reason}\n".encode()
    return (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    ).encode() + headers + b"\r\n" + body
