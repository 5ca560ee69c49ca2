"""The sink's configuration: one frozen object built by the CLI (or by code embedding the sink).

It owns parsing of listen addresses and sizes, and the defaults. It never opens files or sockets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailstorm.wire.data import BareLinefeedPolicy

__all__ = ["Address", "SinkConfig", "parse_address"]

# RFC 5321 4.5.3.2.7: a server should wait at least 5 minutes for the next command.
DEFAULT_COMMAND_TIMEOUT = 300.0
# RFC 5321 4.5.3.2.5 gives the client 3 minutes per data block; the server waits as long.
DEFAULT_DATA_TIMEOUT = 180.0
DEFAULT_GRACE_PERIOD = 10.0
DEFAULT_MAX_SIZE = 10 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 10_000

_ADDRESS = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})")


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``HOST:PORT`` or ``[IPv6]:PORT``; port 0 asks the system for a free port."""
    m = _ADDRESS.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT or [IPv6]:PORT")
    port = int(m.group("port"))
    if port > 65535:
        raise ValueError(f"bad address {text!r}: port must be 0 to 65535")
    host = m.group("v6") or m.group("host") or ""
    if not host:
        raise ValueError(f"bad address {text!r}: the host is missing (use 0.0.0.0 for all)")
    return Address(host, port)


@dataclass(frozen=True, slots=True)
class SinkConfig:
    listen: tuple[Address, ...] = (Address("127.0.0.1", 2525),)
    tls_listen: tuple[Address, ...] = ()
    hostname: str = "localhost"
    store: str = "discard"
    max_size: int = DEFAULT_MAX_SIZE
    max_recipients: int = 1000
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_errors: int = 20
    auth_file: str | None = None
    auth_required: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure_auth: bool = False
    bare_linefeed: BareLinefeedPolicy = BareLinefeedPolicy.NORMALIZE
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    data_timeout: float = DEFAULT_DATA_TIMEOUT
    grace_period: float = DEFAULT_GRACE_PERIOD
    stats_interval: float = 0.0
    #: Set SO_REUSEPORT on listeners, so several sink processes can share a port.
    reuse_port: bool = False
    #: Worker mode (``--workers``): write a JSON line of counters to stdout this often.
    report_interval: float = 0.0
