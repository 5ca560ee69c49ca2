"""``mailstorm load`` / ``python -m mailstorm.load``: options, validation, the run, and its outputs.

This module owns the command line: parsing and validating options into a ``LoadConfig`` (with
one-line errors and exit status 2), raising the open-files limit, choosing the single-process
or ``--procs`` runner, the live display, the final table, the JSON and HTML reports, and the
``--fail-if`` exit status. It never speaks SMTP itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console

from mailstorm.cliutil import (
    OneLineErrorParser,
    non_negative_int,
    positive_int,
    positive_seconds,
    seconds,
    value_type,
)
from mailstorm.configfile import add_config_options, parse_args
from mailstorm.load.config import OPTION_NAMES, ConfigError, LoadConfig, parse_target
from mailstorm.load.failif import FailIfError, FailIfExpression
from mailstorm.load.limits import ephemeral_port_warning, raise_open_files_limit
from mailstorm.load.stats import RunStats
from mailstorm.load.workload import (
    AddressTemplate,
    MessageFactory,
    WorkloadError,
    parse_size,
    parse_size_mix,
)
from mailstorm.logsetup import add_logging_options, configure_logging, level_from_args
from mailstorm.metrics_http import (
    add_metrics_arguments,
    bind_metrics_socket,
    bound_address,
)

if TYPE_CHECKING:
    from mailstorm.load.live import ProgressDisplay

__all__ = ["main"]

log = logging.getLogger("mailstorm.load")


class _ClosedPipeTolerantConsole(Console):
    """The table's console: when standard output is closed early (``| head``), the rest of
    the table goes nowhere instead of ending the program (rich's default is to exit with
    status 1, silently, before the --json and --html reports are written)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)

class _LoggingConsole(Console):
    """The progress display's console under ``--log-format json`` off a terminal: each plain
    progress line becomes a log record (event ``progress``), so stderr stays all JSON."""

    def print(self, *objects: Any, **options: Any) -> None:
        log.info("%s", " ".join(str(o) for o in objects), extra={"event": "progress"})


DESCRIPTION = """\
Load an SMTP or LMTP server with many concurrent sessions and report throughput and
per-phase latency (connect, banner, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, end of data, QUIT,
whole message) as p50/p90/p99/p99.9/max from HdrHistograms.

Closed loop (default): each session sends its next message as soon as the previous one is
answered (with --pipeline-messages: together with the previous one's content). Open loop
(--rate): messages start on a fixed schedule whatever the server does, and latency counts from
each message's scheduled start, so a stalled server shows in the percentiles
(coordinated-omission safe). The run ends at --messages or --duration, whichever comes first
(10 seconds if neither is given). A message counts as delivered only after the 2xx
to its end of data.

TARGET is HOST:PORT, smtp://HOST:PORT, smtps://HOST:PORT (TLS from the first byte),
lmtp://HOST:PORT, or [IPv6]:PORT. A target without a port needs --port or a scheme
(smtp://HOST is port 25, smtps:// 465, lmtp:// 24): a bare host is an error.

Failing targets: before the run one probe connection is made; if it is refused or times out,
the run does not start (one line on stderr, exit status 4, no report). During the run, a
session whose connection fails (refused, reset, timeout, TLS error, 421) backs off before it
connects again: a random wait between MIN and a ceiling that starts at MIN and doubles with
each failed connection in a row, up to MAX (--backoff, default 0.1:5 seconds). In closed loop
the session waits; in open loop the schedule goes on and each message due while its session
backs off fails at its scheduled time (error kind "backoff"). When the server ends a
connection between messages (a 421, or a close: limits on messages per connection, idle
timeouts), the session reconnects at once and sends the message again; the report counts these
reconnects by reason."""

EPILOG = """\
examples:
  %(prog)s 127.0.0.1:2525 --sessions 100 --messages 10000
  %(prog)s 127.0.0.1:2525 --rate 500 --duration 60 --ramp-up 10 --json run.json --html run.html
  %(prog)s smtp://[::1]:25 --size 1k:70,10k:25,1m:5 --rcpts 3 --pipelining on
  %(prog)s 127.0.0.1:587 --starttls --auth alice:secret --auth-mech LOGIN --per-connection 1
  %(prog)s smtps://mx.test:465 --ca-file ca.pem --eml ./corpus/ --from 'bench{n}@a.test'
  %(prog)s 127.0.0.1:2525 --sessions 10000 --procs 4 --source-address 127.0.0.2 \\
      --source-address 127.0.0.3 --fail-if 'p99(eod)>50ms or error_rate>0.1%%'

TLS: by default the server certificate is NOT verified (load tests usually target test
servers); use --tls-verify (system CAs) or --ca-file to verify.

--fail-if metrics: pN(phase) (p50, p99, p99.9 ...), max(phase), mean(phase) compared with
durations (800us, 50ms, 2s); error_rate (0.001 or 0.1%%); errors, errors(KIND or CODE),
failed, delivered, attempted, msg_rate, mb_rate; combined with and, or, not, parentheses.

exit status: 0 done, 1 the --fail-if expression is true, 2 bad usage, 3 no message was
delivered at all, 4 target unreachable (the probe before the run could not connect; no
report), 130 interrupted. A standard output closed early (| head) cuts the table short but
changes neither the status nor the --json and --html reports."""

#: Exit status of a run in which every attempted message failed.
NOTHING_DELIVERED = 3
#: Exit status when the probe before the run could not connect: the run did not start.
TARGET_UNREACHABLE = 4
#: Exit status of a run ended by Ctrl-C (128 + SIGINT), after its partial report.
INTERRUPTED = 130


def _backoff(text: str) -> tuple[float, float]:
    """``MIN:MAX`` seconds (``0`` turns back-off off)."""
    low_text, sep, high_text = text.partition(":")
    try:
        low = seconds(low_text.strip())
        high = seconds(high_text.strip()) if sep else low
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not MIN:MAX seconds, such as 0.1:5"
        ) from None
    if high < low:
        raise argparse.ArgumentTypeError(f"{text!r}: MAX must not be less than MIN")
    if high > MAX_BACKOFF:
        raise argparse.ArgumentTypeError(f"{text!r}: MAX is at most {MAX_BACKOFF:g} seconds")
    if high > 0 and low == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: MIN must be more than 0 (or 0:0 for off)")
    return low, high


#: The longest back-off --backoff accepts, in seconds.
MAX_BACKOFF = 3600.0


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number per second") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 messages per second")
    return value


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="TARGET", help="server to load (see above)")
    p.add_argument(
        "--port",
        type=_port,
        metavar="PORT",
        help="the port, for a TARGET written without one",
    )
    g = p.add_argument_group("load shape")
    g.add_argument(
        "--sessions",
        "-c",
        type=positive_int,
        default=100,
        metavar="N",
        help="concurrent sessions (default: 100)",
    )
    g.add_argument(
        "--messages", "-m", type=positive_int, metavar="M", help="stop after M messages in total"
    )
    g.add_argument(
        "--duration",
        "-d",
        type=positive_seconds,
        metavar="S",
        help="stop starting messages after S seconds (default: 10 without --messages)",
    )
    g.add_argument(
        "--per-connection",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="QUIT and reconnect after K messages (1 tests connection rate; "
        "default 0: one connection per session for the whole run)",
    )
    g.add_argument(
        "--rate",
        "-r",
        type=_rate,
        metavar="R",
        help="open loop: start R messages per second on a fixed schedule",
    )
    g.add_argument(
        "--ramp-up",
        type=seconds,
        default=0.0,
        metavar="S",
        help="ramp the rate up linearly over S seconds (closed loop: stagger the "
        "session starts over S seconds)",
    )
    g.add_argument(
        "--procs",
        "-P",
        type=positive_int,
        default=1,
        metavar="P",
        help="split the load over P worker processes; results merge exactly",
    )
    g.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        metavar="S",
        help="seconds to wait for each reply (and to connect) (default: 30)",
    )
    g.add_argument(
        "--backoff",
        type=_backoff,
        default=(0.1, 5.0),
        metavar="MIN:MAX",
        help="after a failed connection, wait a random time between MIN and a ceiling "
        "doubling from MIN with each failure in a row, up to MAX seconds (default 0.1:5; "
        "0:0 turns it off)",
    )
    g = p.add_argument_group("messages")
    g.add_argument(
        "--size",
        "-s",
        default="1k",
        metavar="SIZE|MIX",
        help="message size in bytes (512, 10k, 1m; at most 100m) or a weighted mix such as "
        "1k:70,10k:25,1m:5, a weight for every size (default: 1k)",
    )
    g.add_argument(
        "--eml",
        metavar="FILE|DIR",
        help="replay this message file, or every file in this folder, instead",
    )
    g.add_argument(
        "--rcpts",
        type=positive_int,
        default=1,
        metavar="R",
        help="recipients per message (default: 1)",
    )
    g.add_argument(
        "--from",
        dest="mail_from",
        default="loadgen@mailstorm.test",
        metavar="TEMPLATE",
        help="envelope sender; {n} is the message number (default: %(default)s)",
    )
    g.add_argument(
        "--to",
        dest="rcpt_to",
        default="user{r}@mailstorm.test",
        metavar="TEMPLATE",
        help="recipients; {n} message number, {r} recipient number (default: %(default)s)",
    )
    g = p.add_argument_group("protocol")
    g.add_argument(
        "--pipelining",
        choices=("auto", "on", "off"),
        default="auto",
        help="RFC 2920 pipelining: auto uses it when the server offers it",
    )
    g.add_argument(
        "--pipeline-messages",
        action="store_true",
        help="with pipelining and DATA, send each message's MAIL/RCPT/DATA in the same "
        "write as the previous message's content (RFC 2920 3.1): one write per message, "
        "up to two messages in flight per session; their MAIL latency then includes the "
        "server's end of data for the message before",
    )
    g.add_argument(
        "--chunking",
        action="store_true",
        help="send content with BDAT (RFC 3030); the server must offer CHUNKING",
    )
    g.add_argument(
        "--chunk-size",
        type=value_type(parse_size),
        default=0,
        metavar="SIZE",
        help="with --chunking, split content into BDAT chunks of at most SIZE",
    )
    g.add_argument("--starttls", action="store_true", help="upgrade with STARTTLS after EHLO")
    g.add_argument("--auth", metavar="USER:PASS", help="authenticate with these credentials")
    g.add_argument(
        "--auth-mech",
        choices=("PLAIN", "LOGIN"),
        default="PLAIN",
        type=str.upper,
        help="SASL mechanism (default: PLAIN)",
    )
    g.add_argument(
        "--ehlo",
        dest="ehlo_name",
        default="mailstorm.test",
        metavar="NAME",
        help="EHLO/LHLO name (default: %(default)s)",
    )
    g.add_argument("--lmtp", action="store_true", help="speak LMTP (LHLO, a reply per recipient)")
    g = p.add_argument_group("network and TLS")
    g.add_argument(
        "--source-address",
        action="append",
        default=[],
        metavar="ADDR",
        help="local address to connect from; repeat to spread connections "
        "round-robin (avoids running out of ephemeral ports)",
    )
    g.add_argument(
        "--insecure", action="store_true", help="do not verify the server certificate (the default)"
    )
    g.add_argument(
        "--tls-verify",
        action="store_true",
        help="verify the server certificate against the system CAs",
    )
    g.add_argument("--ca-file", metavar="FILE", help="verify against the CAs in this PEM file")
    g.add_argument(
        "--no-tls-resume",
        dest="tls_resume",
        action="store_false",
        help="a full TLS handshake on every connection (by default a session resumes its TLS "
        "session, ticket or ID, on its next connection, as real clients do; the report "
        "times full and resumed handshakes apart)",
    )
    g.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name for SNI and verification (default: the target host)",
    )
    add_metrics_arguments(p, "load")
    g = p.add_argument_group("output")
    g.add_argument("--json", dest="json_path", metavar="FILE", help="write the full JSON report")
    g.add_argument(
        "--html",
        dest="html_path",
        metavar="FILE",
        help="write a self-contained HTML report with plots",
    )
    g.add_argument(
        "--fail-if",
        metavar="EXPR",
        help="exit with status 1 if EXPR is true, e.g. 'p99(eod)>50ms or error_rate>0.1%%'",
    )
    g.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    g.add_argument(
        "--progress-interval",
        type=positive_seconds,
        metavar="S",
        help="seconds between progress updates (default: 1 on a terminal, 5 otherwise)",
    )
    add_config_options(p, secret_keys=("auth",))
    add_logging_options(p, default_level="info", aliases=False)
    return p


def _port(text: str) -> int:
    value = positive_int(text)
    if value > MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to {MAX_PORT})")
    return value


MAX_PORT = 65535


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """Validate the parsed options; raises ConfigError, WorkloadError or FailIfError."""
    target = parse_target(args.target, args.port)
    if args.lmtp and not (target.lmtp or target.implicit_tls):
        target = dataclasses.replace(target, lmtp=True)  # the report then says lmtp://
    size_mix = parse_size_mix(args.size)
    if args.eml and args.size != "1k":
        raise ConfigError("--eml and --size exclude each other")
    AddressTemplate(args.mail_from)
    AddressTemplate(args.rcpt_to)
    auth_user, auth_password = None, ""
    if args.auth is not None:
        auth_user, sep, auth_password = args.auth.partition(":")
        if not sep or not auth_user:
            raise ConfigError(f"bad --auth {args.auth!r}: expected USER:PASS")
    if not _EHLO_NAME.fullmatch(args.ehlo_name):
        raise ConfigError(
            f"bad --ehlo {args.ehlo_name!r}: one word of printable ASCII, such as a host name"
        )
    if args.rcpts > MAX_RCPTS:
        raise ConfigError(f"--rcpts {args.rcpts} is too many: at most {MAX_RCPTS}")
    if args.tls_server_name is not None and not _HOST_NAME.fullmatch(args.tls_server_name):
        raise ConfigError(
            f"bad --tls-server-name {args.tls_server_name!r}: a host name such as mx.example.com"
        )
    if args.eml is not None and not args.eml.strip():
        raise ConfigError("--eml needs a file or folder name")
    for option, path in (("--json", args.json_path), ("--html", args.html_path)):
        if path is not None:
            _check_output_path(option, path)
    if args.ca_file is not None:
        _check_ca_file(args.ca_file)
    if args.chunk_size and not args.chunking:
        raise ConfigError("--chunk-size needs --chunking")
    if args.pipeline_messages and (
        args.chunking or args.lmtp or target.lmtp or args.pipelining == "off"
    ):
        raise ConfigError(
            "--pipeline-messages needs pipelining with DATA "
            "(not --chunking, LMTP or --pipelining off)"
        )
    if args.insecure and (args.tls_verify or args.ca_file):
        raise ConfigError("--insecure contradicts --tls-verify / --ca-file")
    if args.starttls and target.implicit_tls:
        raise ConfigError("--starttls makes no sense with smtps:// (TLS from the start)")
    if args.procs > args.sessions:
        raise ConfigError(f"--procs {args.procs} is more than --sessions {args.sessions}")
    if args.fail_if is not None:
        FailIfExpression(args.fail_if)
    for address in args.source_address:
        _check_ip(address)
    duration = args.duration
    if duration is None and args.messages is None:
        duration = 10.0
    # Options whose destination is a field name (of LoadConfig or ClientConfig) go in as
    # parsed; the rest are derived from the options here.
    options = {name: value for name, value in vars(args).items() if name in OPTION_NAMES}
    options.update(
        size_mix=size_mix,
        size_text=args.size,
        auth_user=auth_user,
        auth_password=auth_password,
        duration=duration,
        source_addresses=list(args.source_address),
        progress_interval=min(args.progress_interval or 1.0, 1.0),
        backoff_min=args.backoff[0],
        backoff_max=args.backoff[1],
    )
    return LoadConfig.from_options(target, **options)


#: An EHLO argument: a domain or an address literal, printable ASCII without spaces.
_EHLO_NAME = re.compile(r"[!-~]{1,255}")
#: A name for SNI and certificate checks: labels of letters, digits, hyphens and underscores.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?")
#: Recipients per message at most (RFC 5321 4.5.3.1.8 asks servers to take 100).
MAX_RCPTS = 1000


def _check_output_path(option: str, path: str) -> None:
    """A report goes where it can be written: checked now, not after the run."""
    from pathlib import Path

    try:
        target = Path(path)
        folder = target.parent
        if not path.strip() or target.is_dir():
            raise ConfigError(f"{option} {path!r}: needs a file name")
        if not folder.is_dir():
            raise ConfigError(f"{option} {path!r}: no such folder {str(folder)!r}")
    except ConfigError:
        raise  # already says what is wrong (it is a ValueError too)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{option} {path!r}: {exc}") from None


def _check_ca_file(path: str) -> None:
    """The CA file loads (the run builds its TLS context from it in every process)."""
    import ssl

    from mailstorm.load.tls import client_ssl_context

    try:
        client_ssl_context(ca_file=path)
    except (OSError, ValueError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"--ca-file {path!r}: {reason}") from None


def _check_ip(address: str) -> None:
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"bad --source-address {address!r}: not an IP address") from None


def _run_single(
    config: LoadConfig,
    stats: RunStats,
    display: ProgressDisplay | None,
    factory: MessageFactory | None = None,
    metrics_socket: socket.socket | None = None,
) -> None:
    import trio

    from mailstorm.load.live import ProgressSnapshot
    from mailstorm.load.runner import build_factory, run_load

    if factory is None:
        factory = build_factory(config)

    def on_progress(run_stats: RunStats, now: float) -> None:
        assert display is not None
        display.update(ProgressSnapshot.take(run_stats, now))

    trio.run(
        lambda: run_load(
            config,
            stats,
            factory=factory,
            on_progress=on_progress if display else None,
            metrics_socket=metrics_socket,
        )
    )


def main(argv: list[str] | None = None, *, prog: str = "mailstorm load") -> int:
    parser = build_parser(prog)
    try:
        args = parse_args(parser, argv)  # over --config FILE; handles --print-config
    except SystemExit as exc:  # --help, or a usage error already printed
        return int(exc.code or 0)
    # Text keeps the plain lines of old (no time stamp); with json every stderr line is JSON.
    level = level_from_args(args, parser, default_level="info", aliases=False)
    configure_logging(args.log_format, level, text_format="%(message)s")
    err: Console = Console(stderr=True, highlight=False)
    if args.log_format == "json" and not err.is_terminal:
        err = _LoggingConsole(stderr=True, highlight=False)
    factory: MessageFactory | None = None
    try:
        config = config_from_args(args)
        if config.eml:
            from mailstorm.load.runner import build_factory

            factory = build_factory(config)  # reads the files now: a bad --eml is a usage error
    except (ConfigError, WorkloadError, FailIfError) as exc:
        log.error("%s: error: %s", prog, exc, extra={"event": "config_error"})
        return 2
    per_process = -(-config.sessions // config.procs)
    problem = raise_open_files_limit(per_process)
    if problem is not None:
        log.error("%s: error: %s", prog, problem, extra={"event": "config_error"})
        return 2
    warning = ephemeral_port_warning(config.sessions, len(config.source_addresses))
    if warning:
        log.warning("warning: %s", warning, extra={"event": "ephemeral_ports"})
    from mailstorm.load.probe import TargetUnreachable, probe_target

    try:
        source = config.source_addresses[0] if config.source_addresses else None
        config.probed_address = probe_target(config.target, config.timeout, source)
    except TargetUnreachable as exc:
        log.error(
            "%s: %s", prog, exc, extra={"event": "target_unreachable", "target": str(config.target)}
        )
        return TARGET_UNREACHABLE
    except ConfigError as exc:
        log.error("%s: error: %s", prog, exc, extra={"event": "config_error"})
        return 2

    metrics_socket = None
    if config.metrics_listen is not None:  # metrics (issue 12)
        try:
            metrics_socket = bind_metrics_socket(config.metrics_listen)
        except ConfigError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        err.print(f"metrics at http://{bound_address(metrics_socket)}/metrics", markup=False)
    display = None
    if not config.quiet:
        from mailstorm.load.live import PLAIN_EVERY, ProgressDisplay

        display = ProgressDisplay(
            err,
            live=err.is_terminal,
            target=str(config.target),
            target_rate=config.rate,
            plain_every=args.progress_interval or PLAIN_EVERY,
        )
    started_at = time.time()
    stats = RunStats()
    status = 0
    if display is not None:
        display.start()
    try:
        if config.procs > 1:
            from mailstorm.load.procs import run_procs

            run_procs(config, stats, display=display, metrics_socket=metrics_socket)
        else:
            _run_single(config, stats, display, factory, metrics_socket)
    except KeyboardInterrupt:
        status = INTERRUPTED
        log.warning(
            "interrupted: reporting what was measured so far", extra={"event": "interrupted"}
        )
    except ConfigError as exc:
        if display is not None:
            display.stop()
        log.error("%s: error: %s", prog, exc, extra={"event": "config_error"})
        return 2
    finally:
        if display is not None:
            display.stop()
        if metrics_socket is not None:
            metrics_socket.close()
    # When the measurement began (after --procs spawned its workers), else the command's start.
    return _report(config, stats, stats.started_wall or started_at, status)


def _report(config: LoadConfig, stats: RunStats, started_at: float, status: int) -> int:
    from mailstorm.load.report import build_report, render_table, write_report_files

    fail_if_result = None
    failed_gate = False
    if config.fail_if:
        failed_gate, explanation = FailIfExpression(config.fail_if).evaluate(stats)
        fail_if_result = {
            "expression": config.fail_if,
            "failed": failed_gate,
            "explanation": explanation,
        }
    report = build_report(
        config,
        stats,
        fail_if=fail_if_result,
        started_at=started_at,
        probe_connections=1,
        interrupted=status == INTERRUPTED,
    )
    console = _ClosedPipeTolerantConsole(highlight=False)
    render_table(report, console)
    write_report_files(report, console, config.json_path, config.html_path)
    if status:
        return status
    if failed_gate:
        return 1
    if stats.attempted and not stats.delivered:
        # Nothing got through (server down, every message refused): a failed run even
        # without --fail-if, so that a plain invocation can gate a pipeline.
        log.error("mailstorm load: no message was delivered", extra={"event": "nothing_delivered"})
        return NOTHING_DELIVERED
    return 0
