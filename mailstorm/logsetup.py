"""Logging set-up shared by ``mailstorm sink`` and ``mailstorm load``: ``--log-format`` and
``--log-level``, and the JSON formatter behind ``--log-format json``.

Why the stdlib: every module already logs through ``logging``; this module only chooses the
level and how a record is written. In JSON each record is one object on one line (``json.dumps``
escapes every control character, so no value can break a line, and its ASCII output leaves no
U+2028 for a line splitter to trip on), with a fixed set of keys and the structured fields a
caller passed with ``extra=``. Nothing here adds content: what a record says is its caller's
decision (and SECURITY.md's promise 10: no message content, password or AUTH exchange).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, TextIO

__all__ = [
    "LEVELS",
    "JsonFormatter",
    "add_logging_options",
    "configure_logging",
    "level_from_args",
]

#: The ``--log-level`` names and their levels.
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: Attributes every ``LogRecord`` has: anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
#: The name of the handler ``configure_logging`` installs (so that it can find it again).
_HANDLER_NAME = "mailstorm.logsetup"
#: The event name of a record that was given none.
DEFAULT_EVENT = "log"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line.

    Keys, always present: ``time`` (RFC 3339, UTC, milliseconds), ``level`` (lower case),
    ``logger``, ``event`` (the caller's short stable name, else ``"log"``) and ``message``
    (the human text); then every field passed with ``extra=`` (values that JSON cannot hold
    are written as their ``str``); ``exception`` and ``stack`` when the record has them.
    """

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": DEFAULT_EVENT,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii (the default): the line is ASCII, every control character escaped.
        return json.dumps(entry, default=str, separators=(",", ":"))


def add_logging_options(
    parser: argparse.ArgumentParser, *, default_level: str, aliases: bool = True
) -> argparse._ArgumentGroup:
    """Add ``--log-format`` and ``--log-level`` to ``parser``, in a group "logging" that is
    returned (a program may add its own logging options to it). ``aliases``: the program
    has ``-v``/``-q`` meaning ``--log-level debug``/``error`` (see ``level_from_args``)."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="how log lines on stderr look: text (default: time and message) or json (one "
        "object per line: time, level, logger, event, message and the event's fields; "
        "read it with jq)",
    )
    group.add_argument(
        "--log-level",
        choices=tuple(LEVELS),
        default=None,
        help=f"least important lines shown (default {default_level})"
        + (
            "; -q is --log-level error and -v is --log-level debug, and neither can be "
            "combined with --log-level"
            if aliases
            else ""
        ),
    )
    return group


def level_from_args(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    *,
    default_level: str,
    aliases: bool = True,
) -> int:
    """The level ``--log-level``, ``-v`` or ``-q`` ask for; a usage error if they disagree.

    With ``aliases`` False, ``args.verbose`` and ``args.quiet`` are not looked at (a program
    whose -q means something else).
    """
    verbose = int(args.verbose) if aliases else 0
    quiet = bool(args.quiet) if aliases else False
    if args.log_level is not None:
        if verbose or quiet:
            parser.error("--log-level cannot be combined with -v or -q")
        return LEVELS[args.log_level]
    if quiet and verbose:
        parser.error("-q and -v cannot be combined")
    if quiet:
        return logging.ERROR
    if verbose:
        return logging.DEBUG
    return LEVELS[default_level]


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, as logging's own
    last-resort handler does: a ``main`` run in-process (by a test) must not leave behind a
    handler bound to a stream that is closed later (pytest's capture), which a thread still
    logging (aiosmtpd's, in the load generator's tests) would then write to."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # StreamHandler.__init__ sets it; the property decides


def configure_logging(
    log_format: str,
    level: int,
    *,
    text_format: str = "%(asctime)s %(message)s",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log record at ``level`` or above to ``stream`` (stderr) in ``log_format``.

    Replaces the handler an earlier call installed (so calling it twice does not double
    lines) and leaves any other alone (pytest's, when a test calls a ``main`` in-process).
    Returns the handler.
    """
    handler: logging.Handler = (
        logging.StreamHandler(stream) if stream is not None else _CurrentStderrHandler()
    )
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(text_format, datefmt="%H:%M:%S"))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in root.handlers[:]:
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
