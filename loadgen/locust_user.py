"""``SMTPUser``: a Locust user that sends mail through ``mailstorm.wire.client``.

This module owns the Locust side of SMTP load: the user class (one connection per user, kept
across messages, QUIT and a new connection after ``per_connection`` messages or after a session
failure), its options (``SMTPOptions``: from class attributes, overridden by the locustfile's
command-line arguments, which ``add_arguments`` registers) and the per-process message factory,
the same ``mailstorm.load.workload`` code ``mailstorm load`` uses (size mixes, ``.eml`` replay,
recipient count, ``{n}``/``{r}`` address templates).

It never speaks SMTP itself (``mailstorm.load.blocking`` drives the sans-IO client over a
socket that Locust's gevent makes cooperative), never retries a message and never decides what
counts: ``mailstorm.load.locust_report`` turns each timed reply into one Locust request event.
Importing it imports locust, which monkey-patches the process for gevent.
"""

from __future__ import annotations

import functools
import itertools
import random
import ssl
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import gevent
from locust import User, task

from mailstorm.load.blocking import BlockingSession, SMTPSessionError
from mailstorm.load.config import Target, parse_target
from mailstorm.load.locust_report import PhaseReporter
from mailstorm.load.tls import client_ssl_context
from mailstorm.load.workload import MessageFactory, OutgoingMessage, parse_size_mix
from mailstorm.wire.client import ClientConfig

__all__ = ["SMTPOptions", "SMTPUser", "add_arguments", "options_error"]


@dataclass(frozen=True, slots=True)
class SMTPOptions:
    """What an ``SMTPUser`` sends and how. Empty strings mean "none" (Locust's web UI form
    keeps each option's type, so none of them is None)."""

    #: A size or a mix, as ``mailstorm load --size``: ``1k``, ``1k:70,10k:25,1m:5``.
    size: str = "1k"
    rcpts: int = 1
    #: Messages per connection before QUIT and a new connection; 0: no limit.
    per_connection: int = 0
    starttls: bool = False
    auth_user: str = ""
    auth_password: str = ""
    auth_mech: str = "PLAIN"
    #: A message file or a folder of them to replay instead of generated messages.
    eml: str = ""
    mail_from: str = "loadgen@mailstorm.test"
    rcpt_to: str = "user{r}@mailstorm.test"
    ehlo: str = "mailstorm.test"
    #: ``auto`` (when the server offers PIPELINING), ``on`` or ``off``.
    pipelining: str = "auto"
    chunking: bool = False
    #: Seconds to wait for a connection or a reply.
    smtp_timeout: float = 30.0
    tls_verify: bool = False
    #: ``MIN:MAX`` seconds, as ``mailstorm load --backoff``: after a failed connection the
    #: user waits a random time between MIN and a ceiling that doubles from MIN with each
    #: failure in a row, up to MAX; ``0:0`` connects again at once.
    backoff: str = "0.1:5"

    @property
    def backoff_range(self) -> tuple[float, float]:
        low_text, sep, high_text = self.backoff.partition(":")
        try:
            low = float(low_text)
            high = float(high_text) if sep else low
        except ValueError:
            low = high = -1.0
        if not 0 <= low <= high <= 300 or (high > 0 and low == 0):
            raise ValueError(
                f"bad --backoff {self.backoff!r}: expected MIN:MAX seconds such as 0.1:5, "
                "MIN more than 0 and MAX at most 300 (0:0 for none)"
            )
        return low, high

    def client_config(self, target: Target) -> ClientConfig:
        return ClientConfig(
            ehlo_name=self.ehlo,
            lmtp=target.lmtp,
            starttls=self.starttls,
            auth_user=self.auth_user or None,
            auth_password=self.auth_password,
            auth_mech=self.auth_mech,
            pipelining=self.pipelining,
            chunking=self.chunking,
        )

    def overridden_by(self, parsed_options: Any) -> SMTPOptions:
        """These options with the values of the same names in Locust's parsed options."""
        if parsed_options is None:
            return self
        changes = {
            f.name: getattr(parsed_options, f.name)
            for f in fields(self)
            if getattr(parsed_options, f.name, None) is not None
        }
        return replace(self, **changes)


_DEFAULTS = SMTPOptions()


def add_arguments(parser: Any) -> None:
    """Register the SMTP options on Locust's parser (``events.init_command_line_parser``);
    they show in the web UI's start form too.

    It also makes ``--stop-timeout`` default to 30 seconds instead of Locust's 0: at the end of
    a run a user then finishes the message it is sending and QUITs, instead of being killed
    between the server's 250 and its arrival, so the successes Locust counts are the messages
    the server accepted. ``--stop-timeout 0`` brings the abrupt stop back.
    """
    parser.add_argument(
        "--size",
        default=_DEFAULTS.size,
        help="message size or mix, as 1k or 1k:70,10k:25,1m:5 (default 1k)",
    )
    parser.add_argument(
        "--rcpts", type=int, default=_DEFAULTS.rcpts, help="recipients per message (default 1)"
    )
    parser.add_argument(
        "--per-connection",
        type=int,
        default=_DEFAULTS.per_connection,
        help="messages per connection before QUIT and reconnect; 0: no limit",
    )
    parser.add_argument(
        "--starttls",
        action="store_true",
        default=False,
        help="STARTTLS before sending (smtp:// and lmtp://)",
    )
    parser.add_argument("--auth-user", default="", help="AUTH as this user")
    parser.add_argument("--auth-password", default="", is_secret=True, help="AUTH password")
    parser.add_argument(
        "--auth-mech",
        default=_DEFAULTS.auth_mech,
        choices=["PLAIN", "LOGIN"],
        help="AUTH mechanism (default PLAIN)",
    )
    parser.add_argument(
        "--eml", default="", help="replay this message file, or every file in this folder"
    )
    parser.add_argument(
        "--mail-from",
        default=_DEFAULTS.mail_from,
        help="sender template; {n} is the message number (default %(default)s)",
    )
    parser.add_argument(
        "--rcpt-to",
        default=_DEFAULTS.rcpt_to,
        help="recipient template; {n} message number, {r} recipient number",
    )
    parser.add_argument("--ehlo", default=_DEFAULTS.ehlo, help="EHLO name")
    parser.add_argument(
        "--pipelining",
        default=_DEFAULTS.pipelining,
        choices=["auto", "on", "off"],
        help="PIPELINING (default auto)",
    )
    parser.add_argument(
        "--chunking",
        action="store_true",
        default=False,
        help="send content with BDAT (the server must offer CHUNKING)",
    )
    parser.add_argument(
        "--smtp-timeout",
        type=float,
        default=_DEFAULTS.smtp_timeout,
        help="seconds to wait for a connection or a reply (default 30)",
    )
    parser.add_argument(
        "--tls-verify",
        action="store_true",
        default=False,
        help="verify the server's certificate (not verified by default)",
    )
    parser.add_argument(
        "--backoff",
        default=_DEFAULTS.backoff,
        help="after a failed connection wait between MIN and a ceiling doubling up to MAX "
        "seconds, as MIN:MAX (default 0.1:5; 0:0 none)",
    )
    parser.set_defaults(stop_timeout=30.0)


def options_error(options: SMTPOptions, host: str | None) -> str | None:
    """What is wrong with these options and target (``--host``), as one line; None if nothing.

    The locustfile calls it at start-up, so a bad value stops Locust at once instead of
    failing every user it spawns. A missing host is not an error here: the web UI asks for it.
    """
    try:
        options.backoff_range  # noqa: B018 (checked for its error)
        if options.per_connection < 0:
            raise ValueError(f"--per-connection {options.per_connection}: must be 0 or more")
        if not 0 < options.smtp_timeout <= 3600:
            raise ValueError(
                f"--smtp-timeout {options.smtp_timeout:g}: must be more than 0, at most 3600 s"
            )
        if host:
            options.client_config(parse_target(host))
        else:
            options.client_config(Target("localhost", 25))
        _factory(options.size, options.eml, options.mail_from, options.rcpt_to, options.rcpts)
    except ValueError as exc:  # ConfigError, WorkloadError and ClientConfig's are ValueErrors
        return str(exc)
    return None


@functools.lru_cache(maxsize=8)
def _factory(size: str, eml: str, mail_from: str, rcpt_to: str, rcpts: int) -> MessageFactory:
    """One factory per process and workload: bodies are built once, shared by every user."""
    return MessageFactory(
        sizes=None if eml else parse_size_mix(size),
        eml_paths=MessageFactory.eml_files(Path(eml)) if eml else None,
        mail_from=mail_from,
        rcpt_to=rcpt_to,
        rcpts=rcpts,
    )


@functools.lru_cache(maxsize=2)
def _ssl_context(verify: bool) -> ssl.SSLContext:
    return client_ssl_context(verify=verify)


#: Message numbers (the ``{n}`` of address templates), unique within a Locust process.
_message_numbers = itertools.count(1)


class SMTPUser(User):
    """Sends one message per task run over a connection it keeps.

    Subclass it in a locustfile; set ``options = SMTPOptions(...)`` for defaults that the
    command-line arguments of ``add_arguments`` (when registered) override. The target is
    Locust's ``--host``: ``smtp://H:P``, ``smtps://H:P``, ``lmtp://H:P`` or ``H:P``.
    """

    abstract = True
    options: ClassVar[SMTPOptions] = SMTPOptions()

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        settings = self.options.overridden_by(getattr(environment, "parsed_options", None))
        self.settings = settings
        if not self.host:
            raise ValueError("SMTPUser needs a target: --host smtp://HOST:PORT")
        self.target = parse_target(self.host)
        self.client_config = settings.client_config(self.target)
        self.factory = _factory(
            settings.size, settings.eml, settings.mail_from, settings.rcpt_to, settings.rcpts
        )
        self.reporter = PhaseReporter(environment.events.request.fire)
        if settings.chunking:
            self.reporter.content_verb = "BDAT"
        if self.target.lmtp:
            self.reporter.hello_verb = "LHLO"
        self.backoff_range = settings.backoff_range
        self.session: BlockingSession | None = None
        #: Messages sent on the current connection.
        self.on_connection = 0
        #: Connections in a row that failed before carrying a message (for the back-off).
        self.failures_in_row = 0

    @task
    def send_mail(self) -> None:
        """Send the next message of the workload."""
        self.send(self.factory.message(next(_message_numbers)))

    def send(self, message: OutgoingMessage) -> bool:
        """Send ``message`` (connecting first if needed); True when it was delivered."""
        session = self.session or self._connect()
        if session is None:
            return False
        reporter = self.reporter
        reporter.message_size = message.size
        started = time.perf_counter()
        try:
            result = session.send(message.mail_from, message.rcpts, message.payload, message.head)
        except SMTPSessionError as exc:
            self._session_failed(exc, started)
            return False
        finally:
            reporter.flush()
        self.on_connection += 1
        self.failures_in_row = 0
        per_connection = self.settings.per_connection
        if per_connection and self.on_connection >= per_connection:
            self.disconnect()
        return result.delivered

    def disconnect(self) -> None:
        """QUIT (reported) and close; the next message connects again."""
        session = self.session
        self.session = None
        if session is not None:
            session.quit()
            self.reporter.flush()

    def on_stop(self) -> None:
        self.disconnect()

    def _connect(self) -> BlockingSession | None:
        settings = self.settings
        target = self.target
        reporter = self.reporter
        reporter.pipelining = False
        session = BlockingSession(
            target.host,
            target.port,
            config=self.client_config,
            timeout=settings.smtp_timeout,
            implicit_tls=target.implicit_tls,
            ssl_context=_ssl_context(settings.tls_verify),
            on_phase=reporter.phase,
        )
        started = time.perf_counter()
        try:
            session.connect()
        except SMTPSessionError as exc:
            self._report_setup(session)
            self._session_failed(exc, started)
            self._back_off()
            return None
        self._report_setup(session)
        assert session.conn is not None
        reporter.pipelining = session.conn.pipelining
        self.session = session
        self.on_connection = 0
        return session

    def _back_off(self) -> None:
        """Wait before connecting again after a failed connection (not after a failure of a
        connection that carried messages: that one reconnects at once)."""
        self.failures_in_row += 1
        low, high = self.backoff_range
        if high <= 0:
            return
        ceiling = min(high, low * 2.0 ** min(self.failures_in_row - 1, 30))
        gevent.sleep(random.uniform(low, max(low, ceiling)))

    def _report_setup(self, session: BlockingSession) -> None:
        """The phases the driver times itself: the TCP connect and TLS handshakes."""
        for phase in ("connect", "tls"):
            seconds = session.setup_phases.get(phase)
            if seconds is not None:
                self.reporter.timed(phase, seconds)

    def _session_failed(self, exc: SMTPSessionError, started: float) -> None:
        """The connection is gone (``BlockingSession`` closed it); report what no reply did."""
        if self.session is not None:
            self.session.close()
        self.session = None
        if exc.kind != "reply":  # a refused reply was reported as its phase's failure
            self.reporter.session_failed(
                exc.phase, exc.kind, exc.detail, time.perf_counter() - started
            )
