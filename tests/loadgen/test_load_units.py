"""Pure pieces of the load generator: targets, sizes, templates, messages, schedule, stats."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstorm.load.config import ConfigError, Target, parse_target
from mailstorm.load.schedule import OpenLoopSchedule, session_start_offset
from mailstorm.load.stats import (
    PHASES,
    RunStats,
    histogram_mean,
    new_histogram,
    value_at_percentiles,
)
from mailstorm.load.workload import (
    AddressTemplate,
    MessageFactory,
    WorkloadError,
    make_text_body,
    parse_size,
    parse_size_mix,
)

# -- targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2525", Target("127.0.0.1", 2525)),
        ("localhost:25", Target("localhost", 25)),
        ("smtp://mx.test:587", Target("mx.test", 587)),
        ("smtps://mx.test:465", Target("mx.test", 465, implicit_tls=True)),
        ("smtps://mx.test", Target("mx.test", 465, implicit_tls=True)),
        ("lmtp://127.0.0.1:24", Target("127.0.0.1", 24, lmtp=True)),
        ("[::1]:2525", Target("::1", 2525)),
        ("smtp://[::1]:2525/", Target("::1", 2525)),
        ("smtp://mx.test", Target("mx.test", 25)),
    ],
)
def test_parse_target(text: str, expected: Target) -> None:
    assert parse_target(text) == expected


def test_a_target_without_port_or_scheme_needs_port() -> None:
    """No silent port 25: a bare host is an error unless --port (or a scheme) says which."""
    with pytest.raises(ConfigError, match=r"no port; write mx\.test:PORT, add --port"):
        parse_target("mx.test")
    assert parse_target("mx.test", port=2525) == Target("mx.test", 2525)
    assert parse_target("smtps://mx.test", port=4650) == Target("mx.test", 4650, True)
    assert parse_target("mx.test:2525", port=2525) == Target("mx.test", 2525)
    with pytest.raises(ConfigError, match="--port 25 contradicts"):
        parse_target("mx.test:2525", port=25)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host:",
        "host:99999",
        "host:abc",
        "http://x:1",
        "::1:25",
        "[::1",
        "[zz]:25",
        "[::1]x",
        "user@host:25",
    ],
)
def test_bad_target(text: str) -> None:
    with pytest.raises(ConfigError, match="bad target"):
        parse_target(text)


def test_target_str_round_trips() -> None:
    for text in ("smtp://127.0.0.1:2525", "smtps://[::1]:465", "lmtp://h:24"):
        assert str(parse_target(text)) == text


# -- sizes and mixes --------------------------------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("512") == 512
    assert parse_size("10k") == 10240
    assert parse_size("1m") == 1 << 20
    assert parse_size("1.5K") == 1536
    assert parse_size("2MiB") == 2 << 20
    for bad in ("", "0", "-1", "1x", "k"):
        with pytest.raises(WorkloadError):
            parse_size(bad)


def test_parse_size_mix() -> None:
    assert parse_size_mix("1k:70,10k:25,1m:5") == [(1024, 70.0), (10240, 25.0), (1 << 20, 5.0)]
    assert parse_size_mix("4k") == [(4096, 1.0)]
    assert parse_size_mix("1k:1, 2k:1") == [(1024, 1.0), (2048, 1.0)]
    # In a mix of several sizes every size needs its weight (issue 15, item 5).
    for bad in ("1k:", "1k:x", "1k:0", "1k:-5", "1k,,2k", "zz:3", "1k:inf", "1k, 2k", "1k:70,10k"):
        with pytest.raises(WorkloadError, match="bad size"):
            parse_size_mix(bad)


@given(st.integers(min_value=0, max_value=5000))
def test_text_body_exact_length_and_clean_lines(length: int) -> None:
    body = make_text_body(length)
    assert len(body) == max(length, 2) if length >= 2 else len(body) == length or body == b"\r\n"
    if length >= 2:
        assert body.endswith(b"\r\n")
        lines = body[:-2].split(b"\r\n")
        assert all(len(line) <= 78 and not line.startswith(b".") for line in lines)
        assert b"\r" not in body.replace(b"\r\n", b"") and b"\n" not in body.replace(b"\r\n", b"")


# -- templates and messages -------------------------------------------------------------------


def test_address_template() -> None:
    t = AddressTemplate("user{n}.{r}@x.test")
    assert t.render(7, 2) == "user7.2@x.test"
    assert AddressTemplate("fixed@x.test").constant == "fixed@x.test"
    for bad in ("a{m}@x", "a{n@x", "<a@x>", "a b@x", "", "a}{@x"):
        with pytest.raises(WorkloadError):
            AddressTemplate(bad)


def test_factory_sizes_and_headers() -> None:
    factory = MessageFactory(sizes=[(1024, 1.0)], mail_from="s{n}@a.test", rcpts=2)
    msg = factory.message(41)
    assert msg.mail_from == "s41@a.test"
    assert msg.rcpts == ["user1@mailstorm.test", "user2@mailstorm.test"]
    assert abs(msg.size - 1024) < 32
    whole = msg.head + msg.payload.raw
    head, _, body = whole.partition(b"\r\n\r\n")
    for header in (b"From:", b"To:", b"Subject:", b"Date:", b"Message-ID: <41.", b"MIME-Version:"):
        assert header in head
    assert body.endswith(b"\r\n")
    # The body is shared between messages: generated once per size.
    assert factory.message(42).payload is msg.payload
    assert factory.message(42).head != msg.head


def test_factory_follows_the_mix_exactly() -> None:
    factory = MessageFactory(sizes=parse_size_mix("1k:70,10k:25,100k:5"))
    sizes = [len(factory.message(n).payload) for n in range(1000)]
    small = sum(1 for s in sizes if s < 2000)
    medium = sum(1 for s in sizes if 2000 <= s < 20000)
    large = sum(1 for s in sizes if s >= 20000)
    assert (small, medium, large) == (700, 250, 50)
    # Interleaved, not in blocks.
    assert 10 < sum(1 for s in sizes[:100] if s < 2000) < 100


def test_factory_replays_eml_folder(tmp_path: Path) -> None:
    (tmp_path / "a.eml").write_bytes(b"Subject: a\n\n.dot line\n")
    (tmp_path / "b.eml").write_bytes(b"Subject: b\r\n\r\nbody")
    (tmp_path / ".hidden").write_bytes(b"ignored")
    files = MessageFactory.eml_files(tmp_path)
    assert [f.name for f in files] == ["a.eml", "b.eml"]
    factory = MessageFactory(eml_paths=files)
    msgs = [factory.message(n) for n in range(4)]
    assert {m.payload.raw for m in msgs} == {
        b"Subject: a\r\n\r\n.dot line\r\n",
        b"Subject: b\r\n\r\nbody\r\n",
    }
    assert all(m.head == b"" for m in msgs)
    assert b"\r\n..dot line\r\n" in msgs[0].payload.stuffed + msgs[1].payload.stuffed
    with pytest.raises(WorkloadError):
        MessageFactory.eml_files(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WorkloadError):
        MessageFactory.eml_files(empty)


# -- schedule ---------------------------------------------------------------------------------


def test_open_loop_constant_rate() -> None:
    s = OpenLoopSchedule(100.0)
    assert [s.offset(n) for n in range(3)] == [0.0, 0.01, 0.02]
    assert s.due_by(1.0) == 100
    assert s.due_by(0.0) == 0
    assert s.due_by(0.005) == 1


def test_open_loop_ramp_up() -> None:
    s = OpenLoopSchedule(100.0, ramp_up=10.0)
    # 500 messages are due during the ramp (the area of the triangle), then 100/s.
    assert s.due_by(10.0) == 500
    assert s.due_by(20.0) == 1500
    assert s.offset(500) == pytest.approx(10.0)
    # Halfway up the ramp, a quarter of the ramp's messages are due.
    assert s.due_by(5.0) == 125
    gaps = [s.offset(n + 1) - s.offset(n) for n in range(100, 499)]
    assert all(a >= b for a, b in itertools.pairwise(gaps))  # speeding up


@given(
    st.floats(min_value=0.1, max_value=1e5),
    st.floats(min_value=0, max_value=100),
    st.integers(min_value=0, max_value=10**6),
)
def test_schedule_offset_and_due_by_agree(rate: float, ramp: float, n: int) -> None:
    s = OpenLoopSchedule(rate, ramp)
    t = s.offset(n)
    assert s.offset(n + 1) >= t
    # Message n is due at t: n messages are due strictly before it.
    assert s.due_by(t) <= n < s.due_by(t + 1e-6) or s.offset(n + 1) == t


def test_closed_loop_ramp_staggers_sessions() -> None:
    assert session_start_offset(0, 10, 5.0) == 0.0
    assert session_start_offset(5, 10, 5.0) == 2.5
    assert session_start_offset(3, 10, 0.0) == 0.0


# -- statistics -------------------------------------------------------------------------------


def test_histogram_merge_is_exact() -> None:
    rng = random.Random(3)
    values = [rng.choice([rng.randint(1, 2000), rng.randint(2000, 10**7)]) for _ in range(5000)]
    direct = new_histogram()
    parts = [RunStats() for _ in range(3)]
    for i, us in enumerate(values):
        direct.record_value(us)
        parts[i % 3].phases.record("eod", us / 1e6)
        parts[i % 3].attempted += 1
    merged = RunStats()
    for part in parts:
        # Through the same wire form the worker processes use.
        merged.merge(RunStats.from_dict(part.to_dict()))
    hist = merged.phases.by_phase["eod"]
    assert hist.get_total_count() == len(values) == merged.attempted
    assert list(hist.counts) == list(direct.counts)
    assert hist.get_max_value() == direct.get_max_value()
    ps = [50.0, 90.0, 99.0, 99.9, 100.0]
    assert value_at_percentiles(hist, ps) == [direct.get_value_at_percentile(p) for p in ps]


def test_percentile_and_mean_helpers_match_hdrh() -> None:
    rng = random.Random(5)
    for n in (1, 7, 3000):
        h = new_histogram()
        for _ in range(n):
            h.record_value(rng.randint(0, 3 * 10**9))
        ps = [0.0, 1.0, 50.0, 99.0, 99.999, 100.0]
        assert value_at_percentiles(h, ps) == [h.get_value_at_percentile(p) for p in ps]
        assert histogram_mean(h) == pytest.approx(h.get_mean_value())
    assert value_at_percentiles(new_histogram(), [50.0]) == [0]


def test_run_stats_round_trip() -> None:
    stats = RunStats(started=100.0)
    stats.attempted = 3
    stats.message_delivered(100.5, 0.25, 1000)
    stats.message_delivered(102.1, 0.5, 2000)
    stats.message_failed(102.2)
    stats.reply_error("rcpt", 550, "5.1.1 unknown")
    stats.error("timeout", "eod: no reply")
    copy = RunStats.from_dict(stats.to_dict())
    assert copy.to_dict() == stats.to_dict()
    assert copy.timeline.delivered == [1, 0, 1]
    assert copy.timeline.bytes == [1000, 0, 2000]
    assert copy.timeline.failed == [0, 0, 1]
    assert copy.errors_by_kind == {"5xx": 1, "timeout": 1}
    assert copy.errors_by_code == {550: 1}
    assert copy.error_rate == pytest.approx(1 / 3)
    assert set(copy.phases.by_phase) == set(PHASES)


def test_recording_many_distinct_values_stays_exact() -> None:
    stats = RunStats()
    for us in range(120_000):  # more distinct values than one pending batch holds
        stats.phases.record("mail", us / 1e6)
    hist = stats.phases.by_phase["mail"]
    assert hist.get_total_count() == 120_000
    assert hist.get_max_value() == hist.get_highest_equivalent_value(119_999)


def test_loop_lag_quantiles_and_exact_merge() -> None:
    """Event-loop lag is kept per whole millisecond and merges exactly across processes."""
    from mailstorm.load.stats import RunStats

    a, b = RunStats(), RunStats()
    for seconds in (0.0, 0.0004, 0.0011, 0.002):
        a.record_loop_lag(seconds)
    for _ in range(96):
        b.record_loop_lag(0.0)
    b.record_loop_lag(0.050)
    a.cpu_s, b.cpu_s = 0.25, 0.5
    a.merge(RunStats.from_dict(b.to_dict()))
    assert a.cpu_s == 0.75  # every process's CPU counts
    assert sum(a.loop_lag.values()) == 101
    assert a.loop_lag_ms(0.5) == 0
    assert a.loop_lag_ms(1.0) == 50
    assert a.loop_lag_ms(0.99) == 2


def test_report_says_when_the_generator_was_saturated() -> None:
    """The JSON report carries the generator's own lag, and flags saturation."""
    import io

    from rich.console import Console

    from mailstorm.load.config import LoadConfig, parse_target
    from mailstorm.load.report import build_report, render_table
    from mailstorm.load.stats import RunStats

    stats = RunStats()
    stats.message_delivered(1.0, 0.001, 1000)
    for _ in range(10):
        stats.record_loop_lag(0.2)
    report = build_report(LoadConfig(target=parse_target("127.0.0.1:25")), stats)
    assert report["generator"] == {"loop_lag_p99_ms": 200, "loop_lag_max_ms": 200,
                                   "saturated": True, "cpu_s": 0.0,
                                   "cpu_per_1000_messages": 0.0,
                                   "unpipelined_connections": 0}
    out = io.StringIO()
    render_table(report, Console(file=out, width=200))
    assert "the load generator itself was saturated" in out.getvalue()
