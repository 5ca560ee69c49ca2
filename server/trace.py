"""Trace headers for stored messages: the Return-Path and the sink's own Received header.

This module owns the exact text the sink prepends to every stored message (RFC 5321 4.4,
RFC 3848 "with" keywords, RFC 5322 folding). It is pure formatting: it never does I/O, never
reads the clock unless the caller leaves ``when`` out, and never sees a password (only the
authenticated username, which is not a secret).

Everything the peer chose (the HELO argument, the AUTH username, the envelope addresses) is
untrusted. Any character that could end the header or forge structure inside it is replaced
before it reaches the output, so no peer can inject a header line or a fake clause.
"""

from __future__ import annotations

import datetime
import email.utils

from mailstorm.wire.events import Envelope

__all__ = ["trace_headers"]

#: RFC 5322 2.1.1: lines SHOULD be at most 78 characters, not counting the CRLF.
MAX_LINE = 78
#: Peer-chosen words are cut to this length: RFC 5322 2.1.1 forbids lines over 998 characters,
#: and an unfoldable word (a HELO, an AUTH username) would otherwise be able to reach it.
MAX_WORD = 255
_PLACEHOLDER = "?"
#: Characters that would end or restructure a bare token in the Received clauses: whitespace
#: splits the token, "(" opens a comment, ";" starts the date, "<>" delimit addresses, and
#: the quote and backslash start quoted strings and quoted pairs.
_TOKEN_SPECIALS = frozenset(' ()<>;"\\')
#: Inside a comment only the parentheses and the backslash are special (RFC 5322 3.2.2
#: ccontent); escaping them as quoted pairs keeps the text readable and the comment balanced.
_COMMENT_ESCAPES = str.maketrans({"(": "\\(", ")": "\\)", "\\": "\\\\"})


def _printable(text: str) -> str:
    """Replace every non-printable character (CR, LF, TAB, other controls, separators)."""
    # str.isprintable is a fast C scan; almost every value passes it, so the per-character
    # rebuild below only runs for hostile or broken input.
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _PLACEHOLDER for ch in text)


def _token(text: str, fallback: str = "unknown") -> str:
    """A peer-chosen word made safe to stand alone as one token of a Received clause."""
    text = _printable(text[:MAX_WORD])
    if not text:
        return fallback
    return "".join(_PLACEHOLDER if ch in _TOKEN_SPECIALS else ch for ch in text)


def _comment_text(text: str) -> str:
    """A peer-chosen string made safe to sit inside a ``( ... )`` comment."""
    return _printable(text[:MAX_WORD]).translate(_COMMENT_ESCAPES)


def _address(text: str) -> str:
    """An envelope address made safe for ``<...>``; otherwise kept as is (UTF-8 included)."""
    # Addresses were parsed by the protocol core already; spaces or ">" can be legitimate in
    # quoted local parts, so only characters that could break the line are replaced.
    return _printable(text)


def _address_literal(ip: str) -> str:
    """The RFC 5321 4.1.3 address literal for a peer IP address."""
    ip = _token(ip)
    if ":" in ip and not ip.lower().startswith("ipv6:"):
        return f"[IPv6:{ip}]"
    return f"[{ip}]"


def _fold(name: str, units: list[str]) -> str:
    """Join ``units`` after ``name:``, breaking lines with CRLF TAB before ``MAX_LINE``.

    A unit is kept on one line when it fits on a line of its own; longer units are split at
    their spaces, and a single word that is still too long is left whole (lines longer than
    ``MAX_LINE`` are then unavoidable, but ``MAX_WORD`` keeps them far below 998).
    """
    lines: list[str] = []
    line = name + ":"
    # True while the current line holds only its prefix (the name or the TAB): a word is then
    # always appended, so no line is ever empty of content.
    fresh = True

    def add(word: str) -> None:
        nonlocal line, fresh
        if fresh or len(line) + 1 + len(word) <= MAX_LINE:
            line += " " + word
        else:
            lines.append(line)
            line = "\t" + word
        fresh = False

    for unit in units:
        fits_here = len(line) + 1 + len(unit) <= MAX_LINE
        if fits_here or fresh or 1 + len(unit) <= MAX_LINE:
            add(unit)
        else:
            for word in unit.split(" "):
                add(word)
    lines.append(line)
    return "\r\n".join(lines)


def trace_headers(
    envelope: Envelope,
    *,
    hostname: str,
    peer_name: str,
    peer_ip: str,
    queue_id: str,
    tls_version: str | None,
    tls_cipher: str | None,
    when: datetime.datetime | None = None,
) -> bytes:
    """The ``Return-Path`` and ``Received`` headers for ``envelope``, CRLF-terminated.

    ``peer_name`` is the peer's verified DNS name or empty (shown as ``unknown``), ``peer_ip``
    its bare address (IPv6 gets the ``IPv6:`` literal prefix). ``when`` defaults to now, in
    local time; a naive ``when`` is taken as local time. Non-ASCII (SMTPUTF8) addresses and
    names are encoded as UTF-8.
    """
    if when is None:
        when = datetime.datetime.now().astimezone()
    elif when.tzinfo is None:
        when = when.astimezone()

    units = [
        f"from {_token(envelope.helo)}",
        f"({_comment_text(peer_name) or 'unknown'} {_address_literal(peer_ip)})",
        f"by {_token(hostname)}",
        "(mailstorm)",
        f"with {_token(envelope.protocol)}",
    ]
    if envelope.tls and (tls_version or tls_cipher):
        details = []
        if tls_version:
            details.append(f"version={_token(tls_version)}")
        if tls_cipher:
            details.append(f"cipher={_token(tls_cipher)}")
        units.append("(" + " ".join(details) + ")")
    if envelope.auth_user:
        units.append(f"(authenticated as {_comment_text(envelope.auth_user)})")
    units.append(f"id {_token(queue_id)}")
    # RFC 5321 7.6: naming the recipient of a multi-recipient message would disclose the other
    # (possibly Bcc) recipients' existence to each of them, so "for" is only used for one.
    if len(envelope.rcpt_tos) == 1:
        units.append(f"for <{_address(envelope.rcpt_tos[0])}>")
    units[-1] += ";"
    units.append(email.utils.format_datetime(when))

    text = f"Return-Path: <{_address(envelope.mail_from)}>\r\n" + _fold("Received", units) + "\r\n"
    return text.encode("utf-8")
