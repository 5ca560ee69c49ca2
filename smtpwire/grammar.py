"""The SMTP command grammar (RFC 5321 4.1.2, with RFC 6531 UTF-8 extensions) as compiled regexes.

Everything a command line can contain is matched here, once per line: ``COMMAND`` splits the
verb from its argument, and ``MAIL_ARGS`` / ``RCPT_ARGS`` check a whole path and its ESMTP
parameters in a single match. Callers dispatch on the upper-cased verb through a table.

Patterns work on ``str`` (the line decoded as UTF-8), so that SMTPUTF8 addresses match the same
rules as ASCII ones; whether non-ASCII is *allowed* is decided by the caller, which knows
whether the client said SMTPUTF8.

This module holds no state and does no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "COMMAND",
    "MAIL_ARGS",
    "RCPT_ARGS",
    "Path",
    "parse_path",
    "split_params",
]

# RFC 6531 3.3: UTF8-non-ascii may appear wherever atext or sub-domain letters may. The
# classes are written as "everything except these ASCII characters", which admits all of
# non-ASCII exactly like an explicit \u0080-\U0010ffff range but compiles 25 times faster
# (such wide ranges made the sink take half a second to start).
#: atext: ALPHA / DIGIT / "!#$%&'*+-/=?^_`{|}~", and non-ASCII.
_ATEXT = r'[^\x00-\x20"(),.:;<>@\[\\\]\x7f]'
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
# qtextSMTP is %d32-33 / %d35-91 / %d93-126 (plus non-ASCII); quoted-pairSMTP is a backslash
# and %d32-126.
_QUOTED_STRING = r'"(?:[^\x00-\x1f"\\\x7f]|\\[\x20-\x7e])*"'
_LOCAL_PART = rf"(?:{_DOT_STRING}|{_QUOTED_STRING})"
#: Let-dig: ALPHA / DIGIT, and non-ASCII (U-labels).
_LET_DIG = r"[^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]"
#: Ldh-str characters: Let-dig and "-".
_LDH = r"[^\x00-\x2c\x2e\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]"
_SUB_DOMAIN = rf"{_LET_DIG}(?:{_LDH}*{_LET_DIG})?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_IPV4 = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}"
# The IPv6 form is checked loosely here and exactly by the caller with ``ipaddress`` if needed;
# the General-address-literal of 4.1.3 (tag ":" dcontent) covers the rest.
_IPV6 = r"IPv6:[0-9A-Fa-f:.]{2,45}"
_GENERAL = r"[A-Za-z0-9\-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+"
_ADDRESS_LITERAL = rf"\[(?:{_IPV4}|{_IPV6}|{_GENERAL})\]"
_MAILBOX = rf"{_LOCAL_PART}@(?:{_DOMAIN}|{_ADDRESS_LITERAL})"
_ADL = rf"@{_DOMAIN}(?:,@{_DOMAIN})*"
_PATH = rf"<(?:{_ADL}:)?(?P<mailbox>{_MAILBOX})>"
# esmtp-value is %d33-60 / %d62-126 (no "=", no space), plus UTF-8 under RFC 6531.
_ESMTP_PARAM = r"[A-Za-z0-9][A-Za-z0-9\-]*(?:=[^\x00-\x20=\x7f]+)?"
_PARAMS = rf"(?P<params>(?: +{_ESMTP_PARAM})*)"

#: Verb and argument. The verb is letters only; the argument is everything after one space.
COMMAND = re.compile(r"([A-Za-z]+)(?: (.*))?", re.DOTALL)

#: ``MAIL FROM:`` arguments: a reverse-path (or ``<>``) and ESMTP parameters. One space after
#: the colon is tolerated because widely used clients send it.
MAIL_ARGS = re.compile(rf"FROM: ?(?:<>|{_PATH}){_PARAMS} *", re.IGNORECASE)

#: ``RCPT TO:`` arguments: a forward-path (or the bare ``<Postmaster>``) and ESMTP parameters.
RCPT_ARGS = re.compile(rf"TO: ?(?:(?P<postmaster><postmaster>)|{_PATH}){_PARAMS} *", re.IGNORECASE)

#: RFC 5321 4.5.3.1.3: a path is at most 256 octets including the angle brackets.
MAX_PATH_OCTETS = 256


@dataclass(frozen=True, slots=True)
class Path:
    """A parsed MAIL/RCPT argument."""

    #: The mailbox as sent, without angle brackets and source route; "" for the null path.
    mailbox: str
    #: ESMTP parameters, keywords upper-cased, values as sent (None when there is no "=").
    params: dict[str, str | None]


class DuplicateParameter(ValueError):
    """An ESMTP parameter keyword appears twice."""


def split_params(params: str) -> dict[str, str | None]:
    """Split an already-validated parameter string into a keyword-to-value dict."""
    result: dict[str, str | None] = {}
    for item in params.split():
        key, eq, value = item.partition("=")
        key = key.upper()
        if key in result:
            raise DuplicateParameter(key)
        result[key] = value if eq else None
    return result


def parse_path(match: re.Match[str]) -> Path:
    """Build a ``Path`` from a successful ``MAIL_ARGS`` or ``RCPT_ARGS`` match."""
    groups = match.groupdict()
    mailbox = groups["mailbox"] or ""
    if groups.get("postmaster"):
        mailbox = "Postmaster"
    params = groups["params"]
    return Path(mailbox, split_params(params) if params else {})
