"""The sink behind a proxy: who may send a PROXY header, and reading it before the banner.

With ``--proxy-protocol`` every connection must open with a PROXY header (v1 or v2, parsed by
``mailstorm.wire.proxy``), and only from an address in ``--proxy-from`` (default: loopback).
Anything else (an untrusted source, a malformed, truncated, oversize or late header) is
dropped without a banner, as HAProxy and Postfix's postscreen do, counted in ``SinkStats`` and
logged at debug level. This module owns the trust check, the time bound and the counting; the
session (``session.py``) calls ``receive_proxy_header`` before its first action, so the
readiness hub's inline path is untouched.

The per-address connection limit (``--max-connections-per-ip``) is taken when a connection is
accepted, before any header, so behind a proxy it counts the proxy's address.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from dataclasses import dataclass

import trio

from mailstorm._net.netstream import SocketTransport
from mailstorm.cliutil import positive_seconds, value_type
from mailstorm.errors import ConfigError
from mailstorm.wire.proxy import MAX_HEADER_SIZE, ProxyHeader, ProxyHeaderParser, Refusal

from .stats import SinkStats

__all__ = [
    "DEFAULT_PROXY_FROM",
    "DEFAULT_PROXY_TIMEOUT",
    "ProxyPolicy",
    "ReplayStream",
    "add_proxy_arguments",
    "parse_network",
    "proxy_policy",
    "receive_proxy_header",
]

log = logging.getLogger("mailstorm.sink")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Who may send a header unless told otherwise: a proxy on the same host.
DEFAULT_PROXY_FROM = ("127.0.0.0/8", "::1/128")
#: Seconds a proxy has to send its header: it sends it at once on connecting (HAProxy even
#: before the client's first byte), so a few seconds only ever wait for a broken peer.
DEFAULT_PROXY_TIMEOUT = 5.0


def parse_network(text: str) -> Network:
    """A CIDR block ("10.0.0.0/8", "2001:db8::/32") or a single address; ValueError names it."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"bad network {text!r}: expected an address or CIDR block like 10.0.0.0/8"
        ) from None


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """Who may send PROXY headers, and how long they may take."""

    trusted: tuple[Network, ...]
    timeout: float = DEFAULT_PROXY_TIMEOUT
    max_size: int = MAX_HEADER_SIZE

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False  # "unknown": the peer is already gone
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 from a dual-stack socket is 127.0.0.1
        return any(ip in network for network in self.trusted)


def proxy_policy(enabled: bool, proxy_from: tuple[str, ...], timeout: float) -> ProxyPolicy | None:
    """The policy a configuration asks for (None: no PROXY protocol). Raises ``ConfigError``."""
    if not enabled:
        if proxy_from:
            raise ConfigError("--proxy-from needs --proxy-protocol")
        return None
    try:
        trusted = tuple(parse_network(text) for text in proxy_from or DEFAULT_PROXY_FROM)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not timeout > 0:
        raise ConfigError("--proxy-timeout must be more than 0 seconds")
    return ProxyPolicy(trusted, timeout)


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLI's "PROXY protocol" option group."""
    group = parser.add_argument_group("PROXY protocol (behind HAProxy or a load balancer)")
    group.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="every connection must open with a PROXY header, v1 or v2 (HAProxy send-proxy, "
        "send-proxy-v2); the client address it names goes into Received headers, logs, "
        "the AUTH failure limit and counters. A connection without a valid header, or from "
        "outside --proxy-from, is closed without a banner. --max-connections-per-ip still "
        "counts the proxy's address. With --tls-listen the header precedes the handshake",
    )
    group.add_argument(
        "--proxy-from",
        action="append",
        type=value_type(parse_network),
        metavar="CIDR",
        default=[],
        help="addresses allowed to send PROXY headers, repeatable, e.g. 10.0.0.0/8 "
        f"(default {' and '.join(DEFAULT_PROXY_FROM)}: a proxy on this host); "
        "needs --proxy-protocol",
    )
    group.add_argument(
        "--proxy-timeout",
        type=positive_seconds,
        default=DEFAULT_PROXY_TIMEOUT,
        metavar="SECONDS",
        help=f"time for the PROXY header to arrive (default {DEFAULT_PROXY_TIMEOUT:g})",
    )


async def receive_proxy_header(
    stream: SocketTransport, policy: ProxyPolicy, stats: SinkStats, peer: tuple[str, int]
) -> ProxyHeader | None:
    """Read the connection's PROXY header; None if it is refused (counted and logged).

    Reads at most ``policy.max_size`` octets at a time, so what follows the header (returned
    in ``ProxyHeader.following``) is bounded too.
    """
    ip, port = peer
    if not policy.trusts(ip):
        stats.proxy_refused_untrusted += 1
        log.debug("PROXY: %s:%s is not in --proxy-from: closed", ip, port)
        return None
    parser = ProxyHeaderParser(policy.max_size)
    answer = None
    with trio.move_on_after(policy.timeout):
        while answer is None:
            try:
                data = await stream.receive_some(policy.max_size)
            except trio.BrokenResourceError:
                data = b""  # a reset inside the header: as truncated as a close
            answer = parser.feed(data) if data else parser.end_of_stream()
    if answer is None:
        stats.proxy_refused_timeout += 1
        log.debug("PROXY: no header from %s:%s within %gs: closed", ip, port, policy.timeout)
        return None
    if isinstance(answer, ProxyHeader):
        stats.proxy_accepted += 1
        log.debug(
            "PROXY v%d %s %s from %s:%s: client %s",
            answer.version,
            answer.command.value,
            answer.family.value,
            ip,
            port,
            _endpoint(answer.client) if answer.client else "(the connection's own)",
        )
        return answer
    if answer.reason is Refusal.TRUNCATED:
        stats.proxy_refused_truncated += 1
    elif answer.reason.oversize:
        stats.proxy_refused_oversize += 1
    else:
        stats.proxy_refused_malformed += 1
    log.debug("PROXY header from %s:%s refused: %s", ip, port, answer)
    return None


def _endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ReplayStream(trio.abc.Stream):
    """A stream that first gives back octets already read from it, then reads on.

    For implicit TLS behind a proxy: the ClientHello may arrive in the same read as the PROXY
    header, and the TLS layer must see it.
    """

    def __init__(self, stream: trio.abc.Stream, already_read: bytes) -> None:
        self._stream = stream
        self._replay = already_read

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._replay:
            size = max_bytes or len(self._replay)
            data, self._replay = self._replay[:size], self._replay[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
