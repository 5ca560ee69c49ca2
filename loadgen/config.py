"""The load run's configuration: the target address and every option, validated.

This module owns parsing a TARGET (``host:port``, ``smtp://``, ``smtps://``, ``lmtp://``,
``[::1]:port``) and the ``LoadConfig`` value that the CLI builds and every other module reads
(it is pickled to worker processes, so it holds only plain data). The options of the SMTP
conversation itself are not repeated here: ``LoadConfig.client`` is the run's ``ClientConfig``,
and ``LoadConfig.from_options`` sorts flat options into the two by their dataclass fields. It
never opens sockets and never reads files other than through the workload it describes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from mailstorm.cliutil import split_host_port
from mailstorm.errors import ConfigError
from mailstorm.metrics_http import MetricsAddress
from mailstorm.wire.client import ClientConfig

__all__ = ["OPTION_NAMES", "ConfigError", "LoadConfig", "Target", "parse_target"]


_SCHEMES = {"smtp": (25, False, False), "smtps": (465, True, False), "lmtp": (24, False, True)}


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    #: smtps://: TLS from the first byte (RFC 8314).
    implicit_tls: bool = False
    #: lmtp://: speak LMTP.
    lmtp: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "smtps" if self.implicit_tls else "lmtp" if self.lmtp else "smtp"
        return f"{scheme}://{host}:{self.port}"


def parse_target(text: str, port: int | None = None) -> Target:
    """``HOST:PORT``, ``smtp://HOST:PORT``, ``smtps://HOST:PORT``, ``lmtp://HOST:PORT``;
    IPv6 literals in brackets.

    Without a port in the text, ``port`` (``--port``) says which; failing that, a scheme
    means its standard port (25, 465 or 24), and a bare host is an error: a load generator
    that silently hits port 25 of the wrong machine is worse than one that asks.
    """
    original = text
    if not text.isprintable() or text != text.strip():
        raise ConfigError(f"bad target {original!r}: expected HOST:PORT")
    scheme = "smtp"
    has_scheme = "://" in text
    if has_scheme:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
        if scheme not in _SCHEMES:
            raise ConfigError(
                f"bad target {original!r}: unknown scheme {scheme!r} (use smtp, smtps or lmtp)"
            )
        text = text.rstrip("/")
    default_port, implicit_tls, lmtp = _SCHEMES[scheme]
    try:
        host, port_text = split_host_port(text)
    except ValueError as exc:
        raise ConfigError(f"bad target {original!r}: {exc}") from None
    if not host:
        raise ConfigError(f"bad target {original!r}: expected HOST:PORT")
    if port_text is None:
        if port is None and not has_scheme:
            raise ConfigError(
                f"bad target {original!r}: no port; write {original}:PORT, add --port PORT, "
                f"or name the protocol (smtp://{original} means port 25)"
            )
        target_port = port if port is not None else default_port
    else:
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"bad target {original!r}: port must be a number from 1 to 65535")
        target_port = int(port_text)
        if port is not None and port != target_port:
            raise ConfigError(f"--port {port} contradicts the port in the target {original!r}")
    return Target(host, target_port, implicit_tls, lmtp)


@dataclass(slots=True)
class LoadConfig:
    """Every option of a run. Defaults are those of the CLI."""

    target: Target
    sessions: int = 100
    messages: int | None = None
    duration: float | None = None
    #: Messages per connection before QUIT; 0 keeps the connection for the whole run.
    per_connection: int = 0
    rcpts: int = 1
    size_mix: list[tuple[int, float]] = field(default_factory=lambda: [(1024, 1.0)])
    size_text: str = "1k"
    eml: str | None = None
    mail_from: str = "loadgen@mailstorm.test"
    rcpt_to: str = "user{r}@mailstorm.test"
    #: The SMTP conversation of every connection: EHLO name, LMTP, STARTTLS, AUTH,
    #: pipelining, BDAT (LMTP also when the target is lmtp://).
    client: ClientConfig = field(default_factory=ClientConfig)
    #: With pipelining, send each message's commands with the previous message's content.
    pipeline_messages: bool = False
    rate: float | None = None
    ramp_up: float = 0.0
    procs: int = 1
    timeout: float = 30.0
    #: After a failed connection (refused, reset, 421, timeout, TLS), a session waits a random
    #: time between ``backoff_min`` and a ceiling that doubles from ``backoff_min`` with each
    #: failure in a row, up to ``backoff_max`` seconds (``--backoff MIN:MAX``).
    backoff_min: float = 0.1
    backoff_max: float = 5.0
    json_path: str | None = None
    html_path: str | None = None
    fail_if: str | None = None
    source_addresses: list[str] = field(default_factory=list)
    tls_verify: bool = False
    #: Offer each session's TLS session (ticket) again on its next connection, as real
    #: clients do (``--no-tls-resume``: a full handshake every time).
    tls_resume: bool = True
    ca_file: str | None = None
    tls_server_name: str | None = None
    quiet: bool = False
    progress_interval: float = 1.0
    #: (address family, socket address) the probe before the run connected to: the run
    #: connects there without resolving and probing the name again (None: it does).
    probed_address: tuple[int, tuple[Any, ...]] | None = None
    # ---- Prometheus metrics (issue 12) ----
    #: Serve the run's live counters at ``/metrics`` here (None: no endpoint).
    metrics_listen: MetricsAddress | None = None

    def __post_init__(self) -> None:
        if self.target.lmtp and not self.client.lmtp:
            # lmtp:// means LMTP whatever the options say (as --lmtp does).
            self.client = replace(self.client, lmtp=True)

    @classmethod
    def from_options(cls, target: Target, **options: Any) -> LoadConfig:
        """A LoadConfig from flat options, each named after a field of ``LoadConfig`` or of
        ``ClientConfig``: the latter make up ``client``. Unknown names raise TypeError."""
        client = {name: options.pop(name) for name in _CLIENT_FIELDS & options.keys()}
        return cls(target=target, client=ClientConfig(**client), **options)

    @property
    def starttls(self) -> bool:
        return self.client.starttls

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    def sessions_for(self, worker: int, workers: int) -> int:
        """This worker's share of the sessions (the first ones take the remainder)."""
        return self.sessions // workers + (1 if worker < self.sessions % workers else 0)

    def to_report(self) -> dict[str, Any]:
        """The configuration as the JSON report shows it (the password is not shown)."""
        data: dict[str, Any] = {}
        for name, value in asdict(self).items():
            if name != "client":
                data[name] = value
                continue
            # The report keeps one flat level of options, with the CLI's names.
            for client_name, client_value in value.items():
                data["ehlo" if client_name == "ehlo_name" else client_name] = client_value
        data["target"] = str(self.target)
        data["auth_password"] = "***" if self.client.auth_password else ""
        data["size_mix"] = [{"bytes": s, "weight": w} for s, w in self.size_mix]
        data["mode"] = "open-loop" if self.open_loop else "closed-loop"
        return data


_CLIENT_FIELDS = frozenset(f.name for f in fields(ClientConfig))
#: Every option name ``LoadConfig.from_options`` takes (``target`` aside).
OPTION_NAMES = _CLIENT_FIELDS | {f.name for f in fields(LoadConfig)} - {"client", "target"}
