"""The one HOST:PORT parser (``mailstorm.cliutil.split_host_port``) that the sink's listeners
and the load generator's target share, and the two callers' own rules on top of it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstorm.cliutil import split_host_port
from mailstorm.errors import ConfigError
from mailstorm.load.config import parse_target
from mailstorm.sink.config import Address, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2525", ("127.0.0.1", "2525")),
        ("mx.test", ("mx.test", None)),
        ("[::1]:25", ("::1", "25")),
        ("[::1]", ("::1", None)),
        ("[fe80::1%eth0]:25", ("fe80::1%eth0", "25")),
        (":25", ("", "25")),
    ],
)
def test_splits(text: str, expected: tuple[str, str | None]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[::1", "missing ']'"),
        ("[mx.test]:25", "not an IPv6 address"),
        ("[::1]25", "expected ':PORT' after ']'"),
        ("::1:25", "put an IPv6 address in brackets"),
        ("mx.test:", "empty port"),
        ("user@mx.test:25", "expected HOST:PORT"),
        ("mx test:25", "expected HOST:PORT"),
    ],
)
def test_refuses_with_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        split_host_port(text)


@given(st.text(max_size=40))
def test_any_text_splits_or_says_why(text: str) -> None:
    try:
        host, _port = split_host_port(text)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert ":" not in host or text.startswith("[")


def test_the_sink_wants_a_port_and_allows_zero() -> None:
    assert parse_address("[::1]:0") == Address("::1", 0)
    with pytest.raises(ValueError, match="expected HOST:PORT or"):
        parse_address("127.0.0.1")
    with pytest.raises(ValueError, match="the host is missing"):
        parse_address(":25")
    with pytest.raises(ValueError, match="port must be 0 to 65535"):
        parse_address("127.0.0.1:70000")


def test_the_load_generator_wants_a_port_unless_a_scheme_or_port_says() -> None:
    assert parse_target("smtp://[::1]").port == 25
    assert parse_target("mx.test", port=2525).port == 2525
    with pytest.raises(ConfigError, match="no port"):
        parse_target("mx.test")
    with pytest.raises(ConfigError, match="from 1 to 65535"):
        parse_target("mx.test:0")
    with pytest.raises(ConfigError, match="put an IPv6 address in brackets"):
        parse_target("::1:25")
