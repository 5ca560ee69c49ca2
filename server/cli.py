"""``mailstorm sink``: command-line parsing, start-up checks, signals, and the run.

It turns arguments into a ``SinkConfig``, reports every unusable setting as one line on stderr
with exit status 2 (1 for a listener that cannot bind), and maps SIGINT/SIGTERM to a graceful
shutdown (a second signal skips the grace period).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from mailstorm.cliutil import (
    OneLineErrorParser,
    non_negative_int,
    parse_size,
    positive_int,
    raise_open_files_limit,
    seconds,
    value_type,
)
from mailstorm.configfile import add_config_options, effective_argv, parse_args
from mailstorm.logsetup import configure_logging, level_from_args
from mailstorm.metrics_http import add_metrics_arguments, bind_metrics_socket
from mailstorm.wire.data import BareLinefeedPolicy

from .app import ConfigError, SinkServer, listening_sockets
from .config import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_DATA_TIMEOUT,
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_AUTH_FAILURES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_ERRORS,
    DEFAULT_MAX_JUNK_COMMANDS,
    DEFAULT_MAX_RECIPIENTS,
    DEFAULT_MAX_SESSION_TIME,
    DEFAULT_MAX_SIZE,
    DEFAULT_MIN_DATA_RATE,
    Address,
    SinkConfig,
    parse_address,
)
from .eventlog import EVENTS_LOGGER, add_log_options
from .lmtp_options import add_lmtp_options
from .proxy import add_proxy_arguments
from .workers import WorkerSupervisor, reserve_ports

__all__ = ["build_parser", "main"]

log = logging.getLogger("mailstorm.sink")

EPILOG = """\
examples:
  mailstorm sink                                   discard and count mail on 127.0.0.1:2525
  mailstorm sink --store maildir:./mail --stats-interval 5
  mailstorm sink --listen 127.0.0.1:2525 --listen [::1]:2525 --store mbox:./sink.mbox
  mailstorm sink --tls-cert cert.pem --tls-key key.pem --tls-listen 127.0.0.1:4650 \\
                 --auth-file users.txt --auth-required
  mailstorm sink --fault 'RCPT to=~@reject\\.test:550' --fault 'EOD:452:every=5' \\
                 --delay 'RCPT:100ms:5%' --drop 'DATA:1%' --magic-addresses

limits: 0 means "no limit" for every --max-* option and for --min-data-rate.

auth file: one user per line, "user:password" in plaintext, or "user:$scrypt$..." as printed
by "mailstorm passwd USER". Lines starting with # are comments.

faults: with --workers N every worker injects them; every=N counts and 450-once keys are
per worker process, so with N workers "every=5" is exact per worker, not over the total.

exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 1 if a listener cannot be opened,
2 for bad arguments or unusable files.
"""


def build_parser(prog: str = "mailstorm sink") -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog=prog,
        # Abbreviations would make the supervisor's rewriting of worker arguments ambiguous.
        allow_abbrev=False,
        description="A high-concurrency SMTP sink: accepts mail from many clients at once and "
        "discards, counts, or stores it exactly (Maildir or mbox).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    net = p.add_argument_group("listening")
    net.add_argument(
        "--listen",
        action="append",
        type=value_type(parse_address),
        metavar="HOST:PORT",
        help="plain SMTP listener, repeatable; IPv6 as [::1]:2525 (default 127.0.0.1:2525)",
    )
    net.add_argument(
        "--tls-listen",
        action="append",
        type=value_type(parse_address),
        metavar="HOST:PORT",
        default=[],
        help="implicit-TLS (SMTPS) listener, repeatable; needs --tls-cert",
    )
    net.add_argument(
        "--hostname",
        default="localhost",
        help="name in the banner, EHLO reply and Received headers (default localhost)",
    )
    net.add_argument(
        "--max-connections",
        type=non_negative_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="concurrent sessions before new clients get 421 "
        f"(default {DEFAULT_MAX_CONNECTIONS}; 0 = no limit)",
    )
    net.add_argument(
        "--max-connections-per-ip",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="concurrent sessions from one client address before its new connections get "
        "421; with --workers, per worker (default 0 = no limit, as a load generator "
        "connects from one address)",
    )

    store = p.add_argument_group("storage")
    store.add_argument(
        "--store",
        default="discard",
        metavar="SPEC",
        help="discard (count only; default), maildir:DIR, or mbox:FILE. A 250 "
        "to end of data means the message is on disk (fsynced)",
    )

    limits = p.add_argument_group("limits")
    limits.add_argument(
        "--max-size",
        type=value_type(parse_size),
        default=DEFAULT_MAX_SIZE,
        metavar="BYTES",
        help="largest message, advertised as SIZE; accepts "
        f"k/m/g suffixes (default {DEFAULT_MAX_SIZE}; 0 = no limit)",
    )
    limits.add_argument(
        "--max-recipients",
        type=non_negative_int,
        default=1000,
        metavar="N",
        help=f"recipients per message before 452 (default {DEFAULT_MAX_RECIPIENTS}; "
        "0 = no limit)",
    )
    limits.add_argument(
        "--max-errors",
        type=non_negative_int,
        default=DEFAULT_MAX_ERRORS,
        metavar="N",
        help="protocol errors before the session is ended with 421 "
        f"(default {DEFAULT_MAX_ERRORS}; 0 = no limit)",
    )
    limits.add_argument(
        "--max-junk-commands",
        type=non_negative_int,
        default=DEFAULT_MAX_JUNK_COMMANDS,
        metavar="N",
        help="NOOP, RSET, VRFY, EXPN and HELP commands between accepted messages before the "
        "session is ended with 421, as Postfix's smtpd_junk_command_limit "
        f"(default {DEFAULT_MAX_JUNK_COMMANDS}; 0 = no limit)",
    )
    limits.add_argument(
        "--max-session-time",
        type=seconds,
        default=DEFAULT_MAX_SESSION_TIME,
        metavar="SECONDS",
        help="how long a session may last; then it is ended with 421 once its transaction "
        f"is over (default {DEFAULT_MAX_SESSION_TIME:g}; 0 = no limit)",
    )
    limits.add_argument(
        "--min-data-rate",
        type=value_type(parse_size),
        default=DEFAULT_MIN_DATA_RATE,
        metavar="BYTES_PER_S",
        help="while a message arrives, every BYTES_PER_S bytes received extend its "
        "--data-timeout by one second, so a slow but steady sender finishes and a trickle "
        f"does not; k/m suffixes accepted (default {DEFAULT_MIN_DATA_RATE:g}; 0 = off)",
    )
    limits.add_argument(
        "--bare-lf",
        choices=[p.value for p in BareLinefeedPolicy],
        default="normalize",
        help="bare CR/LF in message content: normalize to CRLF (default) or "
        "reject the message with 550. Only CRLF.CRLF ever ends DATA",
    )
    limits.add_argument(
        "--command-timeout",
        type=seconds,
        default=DEFAULT_COMMAND_TIMEOUT,
        metavar="SECONDS",
        help=f"wait for a command (default {DEFAULT_COMMAND_TIMEOUT:g}, RFC 5321 4.5.3.2)",
    )
    limits.add_argument(
        "--data-timeout",
        type=seconds,
        default=DEFAULT_DATA_TIMEOUT,
        metavar="SECONDS",
        help=f"wait for each block of message data (default {DEFAULT_DATA_TIMEOUT:g})",
    )

    sec = p.add_argument_group("authentication and TLS")
    sec.add_argument(
        "--auth-file",
        metavar="FILE",
        help="enable AUTH PLAIN/LOGIN with users from FILE (see below)",
    )
    sec.add_argument(
        "--auth-required",
        action="store_true",
        help="refuse MAIL with 530 until the client has authenticated",
    )
    sec.add_argument(
        "--max-auth-failures",
        type=non_negative_int,
        default=DEFAULT_MAX_AUTH_FAILURES,
        metavar="N",
        help="failed AUTH attempts one client address may make within 15 minutes; past "
        "that its sessions are ended with 421. Each failure is answered after a delay "
        f"growing from 0.25 to 5 seconds (default {DEFAULT_MAX_AUTH_FAILURES}; 0 = no limit)",
    )
    sec.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain): offer STARTTLS")
    sec.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    sec.add_argument(
        "--insecure-auth",
        action="store_true",
        help="with TLS configured, also offer AUTH before STARTTLS (otherwise "
        "538 5.7.11). Without TLS configured AUTH always works on plaintext",
    )

    faults = p.add_argument_group(
        "injected faults, for testing mail clients (see the README; each repeatable)"
    )
    faults.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="reply a failure instead of the usual answer: POINT[ COND...]:REPLY[:TRIGGER], "
        "e.g. 'RCPT:450 4.2.0 mailbox busy:10%%', 'RCPT to=~@reject\\.test:550', "
        "'MAIL from=bounce@*:451', 'EHLO:421' (421 closes), 'EOD:452:every=5' (the message "
        "is not stored). POINT: BANNER, HELO, EHLO, LHLO, MAIL, RCPT, DATA, EOD or another verb",
    )
    faults.add_argument(
        "--delay",
        action="append",
        default=[],
        metavar="SPEC",
        help="wait before answering: POINT[ COND...]:DURATION[:TRIGGER], e.g. 'EOD:2s' (the "
        "message is stored, its 250 waits), 'RCPT:100ms:5%%', 'BANNER:10s' (tarpit)",
    )
    faults.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="SPEC",
        help="close the connection instead of answering: POINT[ COND...][:TRIGGER], e.g. "
        "'DATA:1%%' (after the 354, once content arrives), 'EOD:every=100' (not stored)",
    )
    faults.add_argument(
        "--throttle",
        type=value_type(parse_size),
        default=0,
        metavar="BYTES_PER_S",
        help="read at most this many bytes per second from each session (a slow link for "
        "what the client sends; replies are not throttled); k/m suffixes (default 0 = off)",
    )
    faults.add_argument(
        "--magic-addresses",
        action="store_true",
        help="recipients at fault.invalid choose their fault: 450-once+KEY@fault.invalid, "
        "550@fault.invalid, 421@fault.invalid, delay-2s@fault.invalid, drop@fault.invalid",
    )
    faults.add_argument(
        "--fault-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed the randomness of N%% triggers, for a reproducible run (with --workers, "
        "every worker gets the same seed)",
    )

    add_metrics_arguments(p, "sink")
    add_proxy_arguments(p)
    add_lmtp_options(p)
    add_log_options(p)
    run = p.add_argument_group("running")
    run.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="run N sink processes sharing the listening ports (SO_REUSEPORT) under "
        "a supervisor that restarts crashed workers and sums their counters "
        "(default 1)",
    )
    run.add_argument(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT on listeners, so that other processes can serve the same port",
    )
    # Worker mode, set by the supervisor: JSON counters on stdout every SECONDS.
    run.add_argument("--worker-report", type=seconds, default=0.0, help=argparse.SUPPRESS)
    run.add_argument(
        "--stats-interval",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="print a line of counters every SECONDS (default off)",
    )
    run.add_argument(
        "--grace-period",
        type=seconds,
        default=DEFAULT_GRACE_PERIOD,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, time for open transactions "
        f"to finish before the rest get 421 (default {DEFAULT_GRACE_PERIOD:g})",
    )
    run.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="per-session debugging lines: --log-level debug (-vv is the same)",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="only errors: --log-level error")
    add_config_options(p)
    return p


def config_from_args(args: argparse.Namespace) -> SinkConfig:
    return SinkConfig(
        listen=tuple(args.listen or [parse_address("127.0.0.1:2525")]),
        tls_listen=tuple(args.tls_listen),
        hostname=args.hostname,
        store=args.store,
        max_size=args.max_size,
        max_recipients=args.max_recipients,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        max_errors=args.max_errors,
        max_junk_commands=args.max_junk_commands,
        max_auth_failures=args.max_auth_failures,
        max_session_time=args.max_session_time,
        min_data_rate=float(args.min_data_rate),
        auth_file=args.auth_file,
        auth_required=args.auth_required,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        insecure_auth=args.insecure_auth,
        bare_linefeed=BareLinefeedPolicy(args.bare_lf),
        command_timeout=args.command_timeout or DEFAULT_COMMAND_TIMEOUT,
        data_timeout=args.data_timeout or DEFAULT_DATA_TIMEOUT,
        grace_period=args.grace_period,
        stats_interval=args.stats_interval,
        reuse_port=args.reuse_port,
        report_interval=args.worker_report,
        faults=tuple(args.fault),
        delays=tuple(args.delay),
        drops=tuple(args.drop),
        throttle=args.throttle,
        magic_addresses=args.magic_addresses,
        fault_seed=args.fault_seed,
        metrics_listen=args.metrics_listen,
        proxy_protocol=args.proxy_protocol,
        proxy_from=tuple(map(str, args.proxy_from)),
        proxy_timeout=args.proxy_timeout,
        lmtp=args.lmtp,
        log_events=args.log_events,
    )


async def _run(server: SinkServer) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_then_stop, server, nursery.cancel_scope)
            names = ", ".join(_fmt(a) for a in server.addresses)
            tls_names = ", ".join(_fmt(a) for a in server.tls_addresses)
            # A worker (--workers) leaves this line to its supervisor, which says it once.
            log.log(
                logging.DEBUG if server.config.report_interval > 0 else logging.INFO,
                "%s",
                listening_line(
                    names, tls_names, server.store.describe(), lmtp=server.config.lmtp
                ),
                extra={
                    "event": "listening",
                    "listen": [_fmt(a) for a in server.addresses],
                    "tls_listen": [_fmt(a) for a in server.tls_addresses],
                    "store": server.store.describe(),
                },
            )
            if server.metrics_address is not None:
                url = f"http://{server.metrics_address}/metrics"
                log.info("metrics at %s", url, extra={"event": "metrics_listening", "url": url})
            level = logging.DEBUG if server.config.report_interval > 0 else logging.INFO
            seen = 0
            async for signum in signals:
                seen += 1
                name = signal.Signals(signum).name
                extra = {"event": "shutdown", "signal": name, "immediately": seen > 1}
                if seen == 1:
                    log.log(
                        level,
                        "%s: shutting down gracefully (again to stop at once)",
                        name,
                        extra=extra,
                    )
                    server.shutdown()
                else:
                    log.log(level, "%s: stopping now", name, extra=extra)
                    server.shutdown(immediately=True)


async def _serve_then_stop(
    server: SinkServer,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve; when the server has drained, end the signal watcher too."""
    await server.serve(task_status=task_status)
    scope.cancel()


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: list[str] | None = None, prog: str = "mailstorm sink") -> int:
    parser = build_parser(prog)
    args = parse_args(parser, argv)  # over --config FILE; handles --print-config
    configure_logging(args.log_format, level_from_args(args, parser, default_level="info"))
    if args.log_events:
        # Events are asked for by name, so they show whatever --log-level says.
        logging.getLogger(EVENTS_LOGGER).setLevel(logging.INFO)
    config = config_from_args(args)
    try:
        server = SinkServer.from_config(config)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if server.credentials_on_plaintext():
        log.warning(
            "warning: AUTH is offered without TLS: passwords travel in plaintext "
            "(configure --tls-cert/--tls-key to protect them)",
            extra={"event": "auth_without_tls"},
        )
    raise_open_files_limit()
    if args.workers > 1:
        # Workers get the effective options (command line and --config file alike).
        return _supervise(args, config, effective_argv(parser, args), prog, server.store.describe())
    try:
        trio.run(_run, server)
    except KeyboardInterrupt:
        return 0
    except (ConfigError, BaseExceptionGroup) as exc:
        # A listener that cannot bind raises ConfigError inside _run's nursery, which wraps
        # it in an exception group.
        error = _sole_config_error(exc)
        if error is None:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    return 0


def listening_line(names: str, tls_names: str, store: str, *, lmtp: bool = False) -> str:
    """The start-up line: where the sink listens (saying so when it speaks LMTP, not SMTP),
    and where mail goes."""
    return f"mailstorm sink{' (LMTP)' if lmtp else ''} listening on {names or '-'}" + (
        f" (TLS: {tls_names})" if tls_names else ""
    ) + f"; store {store}"


def _supervise(
    args: argparse.Namespace, config: SinkConfig, argv: list[str], prog: str, store: str
) -> int:
    """``--workers N``: check the listeners here, then run N workers under a supervisor."""
    listen, holders = reserve_ports(config.listen)
    tls_listen, tls_holders = reserve_ports(config.tls_listen)
    try:
        for address in [*listen, *tls_listen]:
            # Bind each port once with SO_REUSEPORT, as the workers will: a port held by
            # another program fails here, with the usual one-line error.
            for sock in listening_sockets(address, reuse_port=True):
                sock.close()
        metrics_socket = None
        if config.metrics_listen is not None:
            metrics_socket = bind_metrics_socket(config.metrics_listen)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    worker_args = _worker_args(argv, listen, tls_listen)
    banner = listening_line(
        ", ".join(map(str, listen)), ", ".join(map(str, tls_listen)), store, lmtp=config.lmtp
    )
    supervisor = WorkerSupervisor(
        worker_args,
        args.workers,
        stats_interval=args.stats_interval,
        banner=banner,
        metrics_socket=metrics_socket,
    )
    try:
        return trio.run(supervisor.run)
    finally:
        for holder in holders + tls_holders:
            holder.close()
        if metrics_socket is not None:
            metrics_socket.close()


#: Options the supervisor owns: workers get concrete listeners and report to it instead.
_SUPERVISOR_OPTIONS = (
    "--workers",
    "--listen",
    "--tls-listen",
    "--stats-interval",
    "--metrics-listen",
)


def _worker_args(argv: list[str], listen: list[Address], tls_listen: list[Address]) -> list[str]:
    """The arguments of a worker: the user's, minus what the supervisor owns, plus listeners."""
    worker: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name in _SUPERVISOR_OPTIONS:
            skip_value = "=" not in arg
            continue
        worker.append(arg)
    for address in listen:
        worker += ["--listen", str(address)]
    for address in tls_listen:
        worker += ["--tls-listen", str(address)]
    return worker


def _sole_config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError that ``exc`` is or only wraps (in exception groups), else None."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, ConfigError) else None
