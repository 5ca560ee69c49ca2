"""``--fail-if``: a small, safe expression language over a run's results.

This module owns parsing and evaluating expressions such as
``p99(eod)>50ms or error_rate>0.1%``. It is a hand-written tokenizer and recursive-descent
parser; it never calls ``eval`` and can only read the metrics listed below.

Grammar::

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | "(" expr ")" | comparison
    comparison := operand OP operand          OP: > >= < <= == !=
    operand    := metric | NUMBER [unit]
    metric     := pN(phase) | max(phase) | mean(phase) | error_rate | errors | errors(kind)
                  | failed | delivered | attempted | msg_rate | mb_rate

Latencies (``p99(eod)``, ``p99.9(message)``, ``max(mail)``) compare with durations in ``us``,
``ms`` or ``s``; ``error_rate`` with a fraction (``0.001``) or a percentage (``0.1%``); the
counts and rates with plain numbers. Mixing them up is an error at parse time, so a typo cannot
silently pass a CI gate.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from mailstorm.load.stats import ERROR_KINDS, PHASES, RunStats, histogram_mean

__all__ = ["FailIfError", "FailIfExpression"]


class FailIfError(ValueError):
    """A bad expression; the text is a one-line message naming the position."""


_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<number>\d+(?:\.\d+)?|\.\d+)(?P<unit>us|µs|ms|s|%)?(?![\w.])"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.\d+)?|\d+[A-Za-z_]\w*)"
    r"|(?P<op>>=|<=|==|!=|>|<)"
    r"|(?P<punct>[()])"
    r")",
    re.IGNORECASE,
)
_PERCENTILE = re.compile(r"p(\d+(?:\.\d+)?)")
_TIME_UNITS = {"us": 1.0, "µs": 1.0, "ms": 1000.0, "s": 1_000_000.0}
_COUNTS = {"errors", "failed", "delivered", "attempted"}
_RATES = {"msg_rate", "mb_rate"}

# Dimensions of operands.
_TIME = "time"
_FRACTION = "fraction"
_NUMBER = "number"


@dataclass(slots=True)
class _Token:
    kind: str  # number, name, op, punct, end
    text: str
    pos: int
    value: float = 0.0
    unit: str | None = None


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    stripped_end = len(text.rstrip())
    while pos < stripped_end:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise FailIfError(
                f"bad --fail-if expression at column {pos + 1}: {text[pos:]!r}"
                + _hint(text[pos:].lstrip())
            )
        start = pos + len(m.group(0)) - len(m.group(0).lstrip())
        if m.group("number") is not None:
            unit = m.group("unit").lower() if m.group("unit") else None
            literal = m.group(0).strip()
            tokens.append(_Token("number", literal, start, float(m.group("number")), unit))
        elif m.group("name") is not None:
            tokens.append(_Token("name", m.group("name"), start))
        elif m.group("op") is not None:
            tokens.append(_Token("op", m.group("op"), start))
        else:
            tokens.append(_Token("punct", m.group("punct"), start))
        pos = m.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


#: Slips of comparison operators, and what to say about them.
_OPERATOR_SLIPS = (
    ("=>", "; did you mean '>='?"),
    ("=<", "; did you mean '<='?"),
    ("=", "; use '==' to compare"),
    ("<>", "; use '!=' for 'not equal'"),
)


def _hint(rest: str) -> str:
    """A suggestion for the text where tokenizing stopped, or ""."""
    for slip, hint in _OPERATOR_SLIPS:
        if rest.startswith(slip):
            return hint
    return ""


#: A name that starts like a number: a literal with a unit that does not exist (``50mss``).
_NUMBER_WITH_BAD_UNIT = re.compile(r"\d+(?:\.\d+)?[A-Za-z_]\w*")

Metric = Callable[[RunStats], float]


@dataclass(slots=True)
class _Operand:
    label: str
    dimension: str
    #: For metrics: reads the value from the stats (latencies in microseconds).
    metric: Metric | None = None
    #: For literals: the value in the metric's base unit (us, fraction, number).
    value: float = 0.0
    unit: str | None = None

    def read(self, stats: RunStats) -> float:
        return self.metric(stats) if self.metric is not None else self.value


def _histogram_metric(func: str, phase: str) -> Metric:
    if func == "max":
        return lambda s: float(s.phases.by_phase[phase].get_max_value())
    if func == "mean":
        return lambda s: histogram_mean(s.phases.by_phase[phase])
    percentile = float(func[1:])
    return lambda s: float(s.phases.by_phase[phase].get_value_at_percentile(percentile))


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


class _Node:
    def evaluate(self, stats: RunStats, explain: list[str]) -> bool:
        raise NotImplementedError


@dataclass(slots=True)
class _Compare(_Node):
    left: _Operand
    op: str
    right: _Operand

    def evaluate(self, stats: RunStats, explain: list[str]) -> bool:
        a = self.left.read(stats)
        b = self.right.read(stats)
        result = _OPS[self.op](a, b)
        explain.append(
            f"{self.left.label} {self.op} {self.right.label}: "
            f"{_show(a, self.left)} {self.op} {_show(b, self.right)} -> {str(result).lower()}"
        )
        return result


def _show(value: float, operand: _Operand) -> str:
    if operand.dimension == _TIME:
        return f"{value / 1000:.3f}ms"
    if operand.dimension == _FRACTION:
        return f"{value * 100:.4g}%"
    return f"{value:g}"


@dataclass(slots=True)
class _BoolOp(_Node):
    op: str  # "and" / "or"
    parts: list[_Node]

    def evaluate(self, stats: RunStats, explain: list[str]) -> bool:
        # Every part is evaluated (no short-circuit) so the explanation shows all of them.
        results = [part.evaluate(stats, explain) for part in self.parts]
        return all(results) if self.op == "and" else any(results)


@dataclass(slots=True)
class _Not(_Node):
    inner: _Node

    def evaluate(self, stats: RunStats, explain: list[str]) -> bool:
        return not self.inner.evaluate(stats, explain)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def error(self, token: _Token, message: str) -> FailIfError:
        where = f"at column {token.pos + 1}" if token.kind != "end" else "at the end"
        return FailIfError(f"bad --fail-if expression {self.text!r} {where}: {message}")

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token.kind == "name" and token.text.lower() == word:
            self.i += 1
            return True
        return False

    def parse(self) -> _Node:
        node = self.expr()
        token = self.peek()
        if token.kind != "end":
            raise self.error(token, f"unexpected {token.text!r} (missing 'and' / 'or'?)")
        return node

    def expr(self) -> _Node:
        parts = [self.and_expr()]
        while self.keyword("or"):
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else _BoolOp("or", parts)

    def and_expr(self) -> _Node:
        parts = [self.not_expr()]
        while self.keyword("and"):
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else _BoolOp("and", parts)

    def not_expr(self) -> _Node:
        if self.keyword("not"):
            return _Not(self.not_expr())
        token = self.peek()
        if token.kind == "punct" and token.text == "(":
            self.take()
            node = self.expr()
            closing = self.take()
            if closing.kind != "punct" or closing.text != ")":
                raise self.error(closing, "expected ')'")
            return node
        return self.comparison()

    def comparison(self) -> _Node:
        left_token = self.peek()
        left = self.operand()
        op = self.take()
        if op.kind != "op":
            raise self.error(op, "expected a comparison (>, >=, <, <=, ==, !=)")
        right_token = self.peek()
        right = self.operand()
        if left.metric is None and right.metric is None:
            raise self.error(left_token, "a comparison needs a metric such as p99(eod)")
        # A literal takes the dimension of the metric it is compared with.
        for lit, lit_token, other in ((left, left_token, right), (right, right_token, left)):
            if lit.metric is None:
                self.fit_literal(lit, lit_token, other)
        if left.dimension != right.dimension:
            raise self.error(left_token, f"cannot compare {left.label} with {right.label}")
        return _Compare(left, op.text, right)

    def fit_literal(self, lit: _Operand, token: _Token, other: _Operand) -> None:
        unit = lit.unit
        if other.dimension == _TIME:
            if unit not in _TIME_UNITS:
                raise self.error(token, f"{other.label} needs a duration such as 50ms, 2s or 800us")
            lit.value *= _TIME_UNITS[unit]
            lit.dimension = _TIME
        elif other.dimension == _FRACTION:
            if unit == "%":
                lit.value /= 100.0
            elif unit is not None:
                raise self.error(token, f"{other.label} is a fraction: use 0.001 or 0.1%")
            lit.dimension = _FRACTION
        else:
            if unit is not None:
                raise self.error(token, f"{other.label} is a plain number, without a unit")
            lit.dimension = _NUMBER

    def operand(self) -> _Operand:
        token = self.take()
        if token.kind == "number":
            return _Operand(token.text, "literal", value=token.value, unit=token.unit)
        if token.kind != "name":
            raise self.error(token, "expected a metric or a number")
        name = token.text.lower()
        nxt = self.peek()
        if nxt.kind == "punct" and nxt.text == "(":
            self.take()
            arg = self.take()
            if arg.kind not in ("name", "number"):
                raise self.error(arg, "expected a phase or an error kind")
            closing = self.take()
            if closing.kind != "punct" or closing.text != ")":
                raise self.error(closing, "expected ')'")
            return self.call(token, name, arg)
        if name == "error_rate":
            return _Operand(name, _FRACTION, metric=lambda s: s.error_rate)
        if name in _COUNTS:
            return _Operand(name, _NUMBER, metric=functools.partial(_count_metric, name))
        if name == "msg_rate":
            return _Operand(name, _NUMBER, metric=lambda s: s.msg_rate)
        if name == "mb_rate":
            return _Operand(name, _NUMBER, metric=lambda s: s.byte_rate / 1_000_000)
        if _PERCENTILE.fullmatch(name) or name in ("max", "mean"):
            raise self.error(nxt, f"{name} needs a phase, as in {name}(eod)")
        if _NUMBER_WITH_BAD_UNIT.fullmatch(token.text):
            raise self.error(
                token,
                f"{token.text!r}: a duration is a number with us, ms or s (50ms), a fraction a "
                "number or a percentage (0.1%), a count a plain number",
            )
        raise self.error(
            token,
            f"unknown metric {token.text!r} (use pN(phase), max(phase), mean(phase), "
            "error_rate, errors, failed, delivered, attempted, msg_rate, mb_rate)",
        )

    def call(self, func_token: _Token, func: str, arg: _Token) -> _Operand:
        argument = arg.text.lower()
        label = f"{func}({argument})"
        if func == "errors":
            if argument.isdigit():
                code = int(argument)
                return _Operand(label, _NUMBER, metric=lambda s: float(s.errors_by_code[code]))
            if argument not in ERROR_KINDS:
                raise self.error(arg, f"unknown error kind {arg.text!r} ({', '.join(ERROR_KINDS)})")
            return _Operand(label, _NUMBER, metric=lambda s: float(s.errors_by_kind[argument]))
        m = _PERCENTILE.fullmatch(func)
        if m is None and func not in ("max", "mean"):
            raise self.error(func_token, f"unknown function {func_token.text!r}")
        if m is not None and not 0 <= float(m.group(1)) <= 100:
            raise self.error(func_token, "a percentile is between p0 and p100")
        if argument not in PHASES:
            raise self.error(arg, f"unknown phase {arg.text!r} ({', '.join(PHASES)})")
        return _Operand(label, _TIME, metric=_histogram_metric(func, argument))


class FailIfExpression:
    """A parsed ``--fail-if`` expression."""

    __slots__ = ("_root", "text")

    def __init__(self, text: str) -> None:
        if not text.strip():
            raise FailIfError("bad --fail-if expression: empty")
        self.text = text
        self._root = _Parser(text).parse()

    def evaluate(self, stats: RunStats) -> tuple[bool, list[str]]:
        """Whether the run fails the gate, and one line per comparison saying why."""
        explain: list[str] = []
        return self._root.evaluate(stats, explain), explain


def _count_metric(name: str, stats: RunStats) -> float:
    """A count from the run summary, as a number to compare (for counts like ``failed``)."""
    return float(getattr(stats, name))
