"""``--fail-if``: parsing (with clear errors) and evaluation against known statistics."""

from __future__ import annotations

import pytest

from mailstorm.load.failif import FailIfError, FailIfExpression
from mailstorm.load.stats import RunStats


@pytest.fixture
def stats() -> RunStats:
    """1000 attempted, 998 delivered (eod 10ms .. 19.99ms), 2 failed with 451, 10 s."""
    s = RunStats()
    s.attempted = 1000
    s.delivered = 998
    s.failed = 2
    s.elapsed = 10.0
    s.bytes_delivered = 998 * 10_000
    for i in range(998):
        s.phases.record("eod", 0.010 + i * 0.00001)
        s.phases.record("message", 0.020 + i * 0.00001)
    s.reply_error("eod", 451, "4.3.0 later")
    s.reply_error("eod", 451, "4.3.0 later")
    return s


def check(text: str, stats: RunStats) -> bool:
    return FailIfExpression(text).evaluate(stats)[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("p99(eod)>50ms", False),
        ("p99(eod)>15ms", True),
        ("p50(eod) < 0.02s", True),
        ("p99.9(message)>=20000us", True),
        ("max(eod) > 19ms", True),
        ("mean(eod) > 16ms", False),
        ("error_rate>0.1%", True),
        ("error_rate > 0.5%", False),
        ("error_rate > 0.001", True),
        ("errors >= 2", True),
        ("errors(4xx) == 2", True),
        ("errors(451) == 2", True),
        ("errors(timeout) > 0", False),
        ("failed != 2", False),
        ("delivered < 1000", True),
        ("attempted == 1000", True),
        ("msg_rate < 100", True),
        ("mb_rate > 1", False),
        ("p99(eod)>50ms or error_rate>0.1%", True),
        ("p99(eod)>50ms and error_rate>0.1%", False),
        ("not (p99(eod)>50ms) and errors > 1", True),
        ("(p99(eod) > 50ms or msg_rate < 150) and delivered > 10", True),
        ("50ms < p99(eod)", False),
        ("P99(EOD) > 1MS", True),
        ("p0(eod) >= 10ms", True),
    ],
)
def test_evaluate(text: str, expected: bool, stats: RunStats) -> None:
    assert check(text, stats) is expected


def test_explanation_names_every_comparison(stats: RunStats) -> None:
    failed, lines = FailIfExpression("p99(eod)>50ms or error_rate>0.1%").evaluate(stats)
    assert failed
    assert len(lines) == 2
    assert lines[0].startswith("p99(eod) > 50ms: ") and lines[0].endswith("-> false")
    assert "0.2%" in lines[1] and lines[1].endswith("-> true")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("p99(eod) > 50", "duration"),
        ("error_rate > 5ms", "fraction"),
        ("errors > 5%", "plain number"),
        ("p99(nope) > 5ms", "unknown phase"),
        ("p101(eod) > 5ms", "between p0 and p100"),
        ("latency > 5ms", "unknown metric"),
        ("p99 > 5ms", "needs a phase"),
        ("p99(eod) 5ms", "comparison"),
        ("p99(eod) > 5ms or", "expected a metric"),
        ("p99(eod) > 5ms error_rate > 1%", "missing 'and'"),
        ("(p99(eod) > 5ms", "expected ')'"),
        ("5 > 3", "needs a metric"),
        ("__import__('os') > 1", "bad --fail-if"),
        ("p99(eod) > 5 ms; rm -rf /", "bad --fail-if"),
        ("errors(nonsense) > 0", "unknown error kind"),
        ("p99(eod) > 50m", "bad --fail-if"),
    ],
)
def test_bad_expressions(text: str, message: str) -> None:
    with pytest.raises(FailIfError, match="bad --fail-if") as info:
        FailIfExpression(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
