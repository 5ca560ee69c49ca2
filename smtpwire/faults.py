"""The fault plan: which replies, delays and drops a sink injects, and when.

This module owns the fault spec grammar (parsing and validation, with one-line errors that name
the problem) and the per-occurrence decisions: ``FaultPlan.decide(point, sender, recipients)``
says whether a command (or the banner, or the end of data) gets an injected reply, a delay or
a dropped connection. ``ServerConnection`` consults it when it is about to answer; the plan
never touches sockets, clocks or files, and it draws randomness only from the ``random``
callable it is given (so a test seeds it).

Grammar (the reply text and the duration cannot contain ``:``; a condition may)::

    fault: POINT[ COND...]:REPLY[:TRIGGER]     e.g.  RCPT to=~@reject\\.test:550
    delay: POINT[ COND...]:DURATION[:TRIGGER]  e.g.  RCPT:100ms:5%
    drop:  POINT[ COND...][:TRIGGER]           e.g.  EOD:every=100

    POINT    BANNER, HELO, EHLO, LHLO, MAIL, RCPT, DATA, EOD (end of data, DATA or BDAT
             LAST), or another verb: RSET, NOOP, QUIT, VRFY, EXPN, HELP, AUTH, STARTTLS.
             In LMTP, EOD is decided per recipient: ``to`` is that recipient, ``every=N``
             counts recipients' answers
    COND     from=GLOB | from=~REGEX | to=GLOB | to=~REGEX (case-insensitive; a GLOB must
             match the whole address, a REGEX anywhere in it; ``to`` matches the RCPT being
             answered, or any recipient at DATA and EOD)
    REPLY    CODE[ ENHANCED][ TEXT], CODE 4xx or 5xx; missing parts come from a default table
    DURATION 2s, 100ms, 1.5 (seconds), 1m
    TRIGGER  N% (a probability), every=N (the Nth, 2Nth, ... occurrence), or none (always)

Occurrences are counted per rule and per plan (one plan per sink process), over the
occurrences whose conditions match. With magic addresses on, recipients at ``fault.invalid``
decide their own RCPT reply (see ``MAGIC_DOMAIN``); their once-keys are kept per plan, at most
``MAX_ONCE_KEYS`` of them.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from .replies import Reply

__all__ = [
    "MAGIC_DOMAIN",
    "POINTS",
    "FaultPlan",
    "FaultSpecError",
    "Rule",
    "Verdict",
    "default_reply",
    "parse_duration",
]

#: Where a fault can be injected: the banner, the end of data, and the commands (BDAT has no
#: point of its own: its chunk must be read whatever the answer; EOD covers BDAT LAST).
POINTS = (
    "BANNER",
    "HELO",
    "EHLO",
    "LHLO",
    "MAIL",
    "RCPT",
    "DATA",
    "EOD",
    "RSET",
    "NOOP",
    "QUIT",
    "VRFY",
    "EXPN",
    "HELP",
    "AUTH",
    "STARTTLS",
)
#: The points at which each envelope condition can be known.
_CONDITION_POINTS = {
    "from": ("MAIL", "RCPT", "DATA", "EOD"),
    "to": ("RCPT", "DATA", "EOD"),
}
#: Recipients at this domain are magic when ``magic_addresses`` is on (RFC 2606: .invalid
#: never resolves, so no real mail is ever addressed there).
MAGIC_DOMAIN = "fault.invalid"
#: Once-keys remembered per plan; the oldest is forgotten past this (memory stays bounded).
MAX_ONCE_KEYS = 10_000
#: The longest delay a magic address may ask for, in seconds.
MAX_MAGIC_DELAY = 300.0

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "": 1.0}
_PROBABILITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")
_EVERY = re.compile(r"every=([0-9]+)", re.IGNORECASE)
_REPLY = re.compile(r"([0-9]{3})(?: +([245]\.[0-9]{1,3}\.[0-9]{1,3})(?= |$))?(?: +(.*))?")
_CONDITION = re.compile(r"(from|to)=(~?)(.+)", re.IGNORECASE)
_MAGIC = re.compile(
    r"(?:(?P<code>[45][0-9][0-9])(?:-once\+(?P<key>[^@]+))?|delay-(?P<delay>[^@]+)|(?P<drop>drop))"
    r"@" + re.escape(MAGIC_DOMAIN),
    re.IGNORECASE,
)

# A code alone gets these (RFC 5321 4.2.3 texts, RFC 3463 enhanced codes); per point first.
_DEFAULT_REPLIES: dict[int, tuple[str, str]] = {
    421: ("4.3.0", "Service not available, closing transmission channel"),
    450: ("4.2.0", "Requested mail action not taken: mailbox unavailable"),
    451: ("4.3.0", "Requested action aborted: local error in processing"),
    452: ("4.3.1", "Requested action not taken: insufficient system storage"),
    454: ("4.7.0", "Temporary failure, try again later"),
    500: ("5.5.2", "Syntax error, command unrecognized"),
    501: ("5.5.4", "Syntax error in parameters or arguments"),
    502: ("5.5.1", "Command not implemented"),
    503: ("5.5.1", "Bad sequence of commands"),
    504: ("5.5.4", "Command parameter not implemented"),
    521: ("5.3.2", "Server does not accept mail"),
    530: ("5.7.0", "Authentication required"),
    535: ("5.7.8", "Authentication credentials invalid"),
    550: ("5.0.0", "Requested action not taken: mailbox unavailable"),
    551: ("5.1.6", "User not local"),
    552: ("5.2.2", "Requested mail action aborted: exceeded storage allocation"),
    553: ("5.1.3", "Requested action not taken: mailbox name not allowed"),
    554: ("5.0.0", "Transaction failed"),
}
_DEFAULT_BY_POINT: dict[tuple[str, int], tuple[str, str]] = {
    ("RCPT", 550): ("5.1.1", "Recipient address rejected: mailbox unavailable"),
    ("MAIL", 550): ("5.1.8", "Sender address rejected"),
    ("MAIL", 553): ("5.1.7", "Sender address rejected: mailbox name not allowed"),
    ("BANNER", 554): ("5.3.2", "No SMTP service here"),
}


class FaultSpecError(ValueError):
    """A fault, delay or drop spec that cannot be used; the message is one line naming it."""


class Kind(Enum):
    REPLY = "fault"
    DELAY = "delay"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do at one occurrence: any of an injected reply, a delay before the answer, and a
    dropped connection (which makes a reply moot). ``why`` names the rules, for the log."""

    reply: Reply | None = None
    delay: float = 0.0
    drop: bool = False
    why: str = ""


def default_reply(code: int, point: str = "", hostname: str = "localhost") -> Reply:
    """The reply injected for a bare ``code`` at ``point``."""
    enhanced, text = _DEFAULT_BY_POINT.get((point, code)) or _DEFAULT_REPLIES.get(code) or (
        f"{code // 100}.0.0",
        "Temporary failure" if code < 500 else "Permanent failure",
    )
    if code == 421:
        text = f"{hostname} {text}"  # RFC 5321 4.2: 421 names the server
    return Reply(code, enhanced, text)


def parse_duration(text: str) -> float:
    """``2s``, ``100ms``, ``1.5`` (seconds) or ``1m``, as seconds; ValueError if not one."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"bad duration {text!r} (expected e.g. 2s, 100ms, 1.5 or 1m)")
    value = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()]
    if not math.isfinite(value):
        raise ValueError(f"bad duration {text!r}")
    return value


@dataclass(slots=True)
class Rule:
    """One parsed spec: where, under which conditions, how often, and what."""

    kind: Kind
    point: str
    spec: str
    reply: Reply | None = None
    delay: float = 0.0
    #: (field, matcher) pairs; all must match.
    conditions: tuple[tuple[str, re.Pattern[str]], ...] = ()
    #: Fire with this probability (0..1); None: no probability.
    probability: float | None = None
    #: Fire on every Nth matching occurrence; 0: not counted that way.
    every: int = 0
    #: Matching occurrences seen so far.
    seen: int = field(default=0, compare=False)

    def matches(self, sender: str | None, recipients: Sequence[str]) -> bool:
        for name, pattern in self.conditions:
            if name == "from":
                if sender is None or pattern.search(sender) is None:
                    return False
            elif not any(pattern.search(rcpt) is not None for rcpt in recipients):
                return False
        return True

    def fires(self, random: Callable[[], float]) -> bool:
        """Count a matching occurrence; True when the rule applies to it."""
        self.seen += 1
        if self.every:
            return self.seen % self.every == 0
        if self.probability is not None:
            return random() < self.probability
        return True


class FaultPlan:
    """The rules of one sink process, and the state they keep (occurrence counts, once-keys).

    Build it with ``from_specs``; a sink shares one plan between all its sessions.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        random: Callable[[], float],
        magic_addresses: bool = False,
        hostname: str = "localhost",
    ) -> None:
        self.rules = tuple(rules)
        self.magic_addresses = magic_addresses
        self.hostname = hostname
        self._random = random
        self._by_point: dict[str, tuple[Rule, ...]] = {}
        for rule in self.rules:
            self._by_point[rule.point] = (*self._by_point.get(rule.point, ()), rule)
        #: Magic once-keys already failed once (insertion order: oldest first).
        self._once_keys: dict[str, None] = {}

    @classmethod
    def from_specs(
        cls,
        *,
        faults: Sequence[str] = (),
        delays: Sequence[str] = (),
        drops: Sequence[str] = (),
        magic_addresses: bool = False,
        random: Callable[[], float],
        hostname: str = "localhost",
    ) -> FaultPlan | None:
        """The plan for these specs, or None when there is nothing to inject.

        Raises ``FaultSpecError`` naming the first bad spec and what is wrong with it.
        """
        rules = [parse_rule(Kind.REPLY, spec, hostname) for spec in faults]
        rules += [parse_rule(Kind.DELAY, spec, hostname) for spec in delays]
        rules += [parse_rule(Kind.DROP, spec, hostname) for spec in drops]
        if not rules and not magic_addresses:
            return None
        return cls(rules, random=random, magic_addresses=magic_addresses, hostname=hostname)

    def applies_to(self, point: str) -> bool:
        """Whether anything could ever happen at ``point``."""
        return point in self._by_point or (self.magic_addresses and point == "RCPT")

    def decide(
        self, point: str, sender: str | None = None, recipients: Sequence[str] = ()
    ) -> Verdict | None:
        """What to do at this occurrence of ``point``; None for nothing (the usual answer).

        Every rule of the point whose conditions match counts the occurrence, whether or not
        another rule fires too, so ``every=N`` stays exact. Of each kind the first rule that
        fires wins; a drop makes a reply moot.
        """
        if self.magic_addresses and point == "RCPT" and recipients:
            magic = self._magic(recipients[0])
            if magic is not None:
                return magic
        rules = self._by_point.get(point)
        if not rules:
            return None
        reply: Reply | None = None
        delay = 0.0
        drop = False
        why: list[str] = []
        for rule in rules:
            if not rule.matches(sender, recipients) or not rule.fires(self._random):
                continue
            kind = rule.kind
            if kind is Kind.REPLY and reply is None:
                reply = rule.reply
            elif kind is Kind.DELAY and not delay:
                delay = rule.delay
            elif kind is Kind.DROP and not drop:
                drop = True
            else:
                continue
            why.append(f"{kind.value} {rule.spec!r}")
        if not why:
            return None
        return Verdict(None if drop else reply, delay, drop, ", ".join(why))

    def _magic(self, address: str) -> Verdict | None:
        """The verdict a magic recipient asks for; None for an ordinary address."""
        if not address.lower().endswith("@" + MAGIC_DOMAIN):
            return None
        why = f"magic address {address!r}"
        m = _MAGIC.fullmatch(address)
        if m is None:
            return Verdict(Reply(550, "5.1.1", f"Unknown fault address <{address}>"), why=why)
        if m.group("drop"):
            return Verdict(drop=True, why=why)
        delay_text = m.group("delay")
        if delay_text is not None:
            try:
                seconds = parse_duration(delay_text)
            except ValueError:
                seconds = -1.0
            if not 0 <= seconds <= MAX_MAGIC_DELAY:
                return Verdict(Reply(550, "5.1.1", f"Bad fault delay <{address}>"), why=why)
            return Verdict(delay=seconds, why=why)
        key = m.group("key")
        if key is not None:
            key = key.lower()
            if key in self._once_keys:
                return None  # the retry: accepted
            self._once_keys[key] = None
            if len(self._once_keys) > MAX_ONCE_KEYS:
                del self._once_keys[next(iter(self._once_keys))]
        return Verdict(default_reply(int(m.group("code")), "RCPT", self.hostname), why=why)


def parse_rule(kind: Kind, spec: str, hostname: str = "localhost") -> Rule:
    """One spec of ``kind``; ``FaultSpecError`` (one line naming the spec) if it is bad."""
    try:
        return _parse_rule(kind, spec, hostname)
    except ValueError as exc:
        raise FaultSpecError(f"bad --{kind.value} {spec!r}: {exc}") from None


def _parse_rule(kind: Kind, spec: str, hostname: str) -> Rule:
    # Fields come off the right: a condition's regex may contain ':', the other fields not.
    rest = spec.strip()
    trigger = ""
    head_tail = rest.rsplit(":", 1)
    if len(head_tail) == 2 and _is_trigger(head_tail[1]):
        rest, trigger = head_tail
    value = ""
    if kind is not Kind.DROP:
        head_tail = rest.rsplit(":", 1)
        if len(head_tail) != 2:
            example = "POINT:REPLY, e.g. RCPT:450"
            if kind is Kind.DELAY:
                example = "POINT:DURATION, e.g. EOD:2s"
            raise ValueError(f"expected {example}")
        rest, value = head_tail
    head = rest.split()
    if not head:
        raise ValueError("the point is missing (BANNER, EHLO, MAIL, RCPT, DATA, EOD, ...)")
    point = head[0].upper()
    if point not in POINTS:
        raise ValueError(f"unknown point {head[0]!r} (expected one of {', '.join(POINTS)})")
    conditions = tuple(_parse_condition(point, text) for text in head[1:])
    rule = Rule(kind, point, spec.strip(), conditions=conditions)
    if kind is Kind.REPLY:
        rule.reply = _parse_reply(value.strip(), point, hostname)
    elif kind is Kind.DELAY:
        rule.delay = parse_duration(value)
        if rule.delay <= 0:
            raise ValueError("the delay must be more than 0")
    if trigger:
        _apply_trigger(rule, trigger)
    return rule


def _is_trigger(text: str) -> bool:
    text = text.strip()
    return _PROBABILITY.fullmatch(text) is not None or _EVERY.fullmatch(text) is not None


def _apply_trigger(rule: Rule, text: str) -> None:
    text = text.strip()
    m = _PROBABILITY.fullmatch(text)
    if m is not None:
        percent = float(m.group(1))
        if not 0 < percent <= 100:
            raise ValueError(f"bad probability {text!r} (expected more than 0% and up to 100%)")
        rule.probability = percent / 100
        return
    m = _EVERY.fullmatch(text)
    assert m is not None
    every = int(m.group(1))
    if every < 1:
        raise ValueError(f"bad {text!r}: every=N needs N of at least 1")
    rule.every = every


def _parse_reply(text: str, point: str, hostname: str) -> Reply:
    m = _REPLY.fullmatch(text)
    if m is None:
        raise ValueError(f"bad reply {text!r} (expected CODE[ ENHANCED][ TEXT], e.g. 450 or "
                         "'450 4.2.0 mailbox busy')")
    code = int(m.group(1))
    if not 400 <= code < 600:
        raise ValueError(f"reply code {code} is not a failure: use a 4xx or 5xx code")
    enhanced, text_part = m.group(2), m.group(3)
    if enhanced is not None and enhanced[0] != str(code)[0]:
        raise ValueError(f"enhanced code {enhanced} does not match reply code {code}")
    default = default_reply(code, point, hostname)
    return Reply(code, enhanced or default.enhanced, (text_part or "").strip() or default.lines[0])


def _parse_condition(point: str, text: str) -> tuple[str, re.Pattern[str]]:
    m = _CONDITION.fullmatch(text)
    if m is None:
        raise ValueError(f"bad condition {text!r} (expected from=GLOB, from=~REGEX, to=GLOB "
                         "or to=~REGEX)")
    name, is_regex, pattern = m.group(1).lower(), m.group(2), m.group(3)
    allowed = _CONDITION_POINTS[name]
    if point not in allowed:
        raise ValueError(f"{name}= cannot be known at {point} (only at {', '.join(allowed)})")
    if is_regex:
        try:
            return name, re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
    return name, re.compile(r"\A" + fnmatch.translate(pattern), re.IGNORECASE)
