"""What the sink's and the load generator's command lines share.

argparse types that turn bad values into one clear line, a parser whose usage errors are one
line with exit status 2, the one parser of ``HOST:PORT`` (the sink's listeners and the load
generator's target), and raising the open-files limit (each session is a descriptor).
It never reads configuration files and never prints anything but errors.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
import resource
from collections.abc import Callable
from typing import NoReturn, TypeVar

__all__ = [
    "OneLineErrorParser",
    "non_negative_int",
    "parse_size",
    "positive_int",
    "positive_seconds",
    "raise_open_files_limit",
    "seconds",
    "size_text",
    "split_host_port",
    "value_type",
]

T = TypeVar("T")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def value_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser that raises ValueError with a message for the user."""

    def parse_arg(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse_arg.__name__ = getattr(parse, "__name__", "value")
    return parse_arg


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


#: The largest byte count ``parse_size`` gives unless told a smaller ``maximum`` (1 EiB).
SIZE_LIMIT = 1 << 60


def split_host_port(text: str) -> tuple[str, str | None]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``: the host, and the port's text
    (None when there is none; checking it is the caller's, whose ranges differ).

    Raises ValueError with what is wrong, for the caller to put after the value it names.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError("missing ']' after the IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ValueError("expected ':PORT' after ']'")
        return host, rest[1:] if rest else None
    if text.count(":") > 1:
        raise ValueError("put an IPv6 address in brackets, [::1]:25")
    host, colon, port = text.partition(":")
    if any(c in host for c in "/@[] \t") or not host.isprintable():
        raise ValueError("expected HOST:PORT")
    if colon and not port:
        raise ValueError("empty port")
    return host, port if colon else None


def size_text(size: int) -> str:
    """A byte count as ``parse_size`` reads it, in the largest unit that divides it."""
    for unit in ("g", "m", "k"):
        factor = _SIZE_UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_size(text: str, *, minimum: int = 0, maximum: int = SIZE_LIMIT) -> int:
    """A byte count: ``"512"``, ``"10k"``, ``"1.5m"``, ``"1MiB"`` (k, m, g are powers of 1024),
    from ``minimum`` to ``maximum``.

    Raises ValueError with a message for the user (naming the limit that was passed); wrap
    with ``value_type`` for argparse.
    """
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"bad size {text!r}: expected a number of bytes like 512, 10k or 1m")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value > maximum:
        raise ValueError(f"bad size {text!r}: at most {size_text(maximum)}")
    size = int(value)
    if size < minimum:
        raise ValueError(f"bad size {text!r}: must be at least {minimum} byte(s)")
    return size


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be at least {minimum}" if minimum else f"{text!r} must not be negative"
        )
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


#: The longest duration ``seconds`` accepts (about 31 years): beyond it, clocks plus the value
#: stop being exact, and no run or timeout means it.
MAX_SECONDS = 1e9


def seconds(text: str) -> float:
    """A non-negative, finite number of seconds up to ``MAX_SECONDS``; a trailing "s" is
    allowed."""
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative number of seconds")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} is too long: at most {MAX_SECONDS:g} seconds")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard) afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        # Linux refuses RLIM_INFINITY for NOFILE; fs.nr_open bounds it, 1M is its default.
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard
