"""The sink's configuration: one frozen object built by the CLI (or by code embedding the sink).

It owns parsing of listen addresses and sizes, and the defaults. It never opens files or sockets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mailstorm.cliutil import split_host_port
from mailstorm.metrics_http import MetricsAddress
from mailstorm.wire.data import BareLinefeedPolicy

__all__ = ["Address", "SinkConfig", "parse_address"]

# RFC 5321 4.5.3.2.7: a server should wait at least 5 minutes for the next command.
DEFAULT_COMMAND_TIMEOUT = 300.0
# RFC 5321 4.5.3.2.5 gives the client 3 minutes per data block; the server waits as long.
DEFAULT_DATA_TIMEOUT = 180.0
DEFAULT_GRACE_PERIOD = 10.0
DEFAULT_MAX_SIZE = 10 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_RECIPIENTS = 1000
DEFAULT_MAX_ERRORS = 20
#: An hour is far more than any real submission needs, and bounds a session that trickles
#: commands just inside the command timeout forever.
DEFAULT_MAX_SESSION_TIME = 3600.0
#: While a message arrives, each this many bytes buy one more second of data deadline
#: (as Apache's mod_reqtimeout MinRate): a modem-speed sender keeps going, a trickle does not.
DEFAULT_MIN_DATA_RATE = 256.0
#: NOOP, RSET, VRFY, EXPN and HELP commands between accepted messages (as Postfix's
#: smtpd_junk_command_limit): a session that only keeps itself alive is ended.
DEFAULT_MAX_JUNK_COMMANDS = 100
#: Failed AUTH attempts per client address within the window (see ``authlimit``).
DEFAULT_MAX_AUTH_FAILURES = 10


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``HOST:PORT`` or ``[IPv6]:PORT``; port 0 asks the system for a free port."""
    try:
        host, port_text = split_host_port(text.strip())
    except ValueError as exc:
        raise ValueError(f"bad address {text!r}: {exc}") from None
    if port_text is None:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT or [IPv6]:PORT")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"bad address {text!r}: port must be 0 to 65535")
    if not host:
        raise ValueError(f"bad address {text!r}: the host is missing (use 0.0.0.0 for all)")
    return Address(host, int(port_text))


#: The limits of ``SinkConfig``: each must be a non-negative number, and 0 means no limit.
LIMIT_FIELDS = (
    "max_size",
    "max_recipients",
    "max_connections",
    "max_connections_per_ip",
    "max_errors",
    "max_junk_commands",
    "max_auth_failures",
    "max_session_time",
    "min_data_rate",
    "throttle",
)


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """Everything a sink needs to know before it starts. In every limit (``LIMIT_FIELDS``),
    0 means no limit."""

    listen: tuple[Address, ...] = (Address("127.0.0.1", 2525),)
    tls_listen: tuple[Address, ...] = ()
    hostname: str = "localhost"
    store: str = "discard"
    max_size: int = DEFAULT_MAX_SIZE
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    #: Concurrent sessions; a client over it gets 421 4.7.0.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Concurrent sessions from one client address; a client over it gets 421 4.7.0. Off by
    #: default because the load generator drives a sink from 127.0.0.1.
    max_connections_per_ip: int = 0
    max_errors: int = DEFAULT_MAX_ERRORS
    #: NOOP, RSET, VRFY, EXPN and HELP commands between accepted messages before the session
    #: is ended with 421.
    max_junk_commands: int = DEFAULT_MAX_JUNK_COMMANDS
    #: Failed AUTH attempts per client address within 15 minutes before its sessions are
    #: ended with 421 4.7.0.
    max_auth_failures: int = DEFAULT_MAX_AUTH_FAILURES
    #: Seconds a session may last; when over, it ends with 421 after its transaction.
    max_session_time: float = DEFAULT_MAX_SESSION_TIME
    #: Bytes per second a message must arrive at: each this many bytes received extend the
    #: data deadline by a second.
    min_data_rate: float = DEFAULT_MIN_DATA_RATE
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
    # ---- injected faults, for testing clients (grammar: ``mailstorm.wire.faults``) ----------
    #: Replies to inject: ``"RCPT:450 4.2.0 mailbox busy:10%"``, ``"EOD:452:every=5"``.
    faults: tuple[str, ...] = ()
    #: Delays before an answer: ``"EOD:2s"``, ``"RCPT:100ms:5%"``, ``"BANNER:10s"``.
    delays: tuple[str, ...] = ()
    #: Connections to close instead of answering: ``"DATA:1%"``, ``"EOD:every=100"``.
    drops: tuple[str, ...] = ()
    #: Octets per second each session reads at most (a slow link); 0 = no throttle.
    throttle: int = 0
    #: Recipients at ``fault.invalid`` choose their own fault (``450-once+KEY@fault.invalid``).
    magic_addresses: bool = False
    #: Seed of the random source behind ``N%`` triggers (None: unpredictable).
    fault_seed: int | None = None
    # ---- Prometheus metrics (issue 12) ----
    #: Serve ``/metrics`` here (None: no metrics endpoint). ``--workers``: the supervisor's.
    metrics_listen: MetricsAddress | None = None
    # ---- PROXY protocol (``server/proxy.py``): every connection opens with a PROXY header ----
    proxy_protocol: bool = False
    #: CIDR blocks allowed to send it (empty: ``proxy.DEFAULT_PROXY_FROM``, loopback).
    proxy_from: tuple[str, ...] = ()
    #: Seconds the header may take to arrive (``proxy.DEFAULT_PROXY_TIMEOUT``).
    proxy_timeout: float = 5.0
    # ---- LMTP (RFC 2033) ---------------------------------------------------------------------
    #: Speak LMTP instead of SMTP: LHLO, and one reply per recipient at the end of data.
    lmtp: bool = False
    # ---- logs (``eventlog``) ----------------------------------------------------------------
    #: Log every session's events (session_start, message_accepted, ...) at INFO to the
    #: logger ``mailstorm.sink.events`` (``--log-events``; off: nothing per message).
    log_events: bool = False

    def __post_init__(self) -> None:
        for name in ("faults", "delays", "drops"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(spec, str) for spec in value):
                raise ValueError(f"{name} must be a sequence of spec strings")
            object.__setattr__(self, name, tuple(value))
        for name in LIMIT_FIELDS:
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative number (0 means no limit)")

