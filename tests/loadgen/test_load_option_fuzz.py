"""Input errors (issue 15, item 5): every option's parser, fed random strings, gives a clean
usage error (one line, exit status 2) or a valid value, never a traceback. Also the limits and
hints the issue names: sizes that do not fit, a size mix with a missing weight, --fail-if
slips such as '=>' and '50mss'.

Nothing here connects anywhere: the options are parsed and validated, not run.
"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstorm.load.cli import build_parser, config_from_args, main
from mailstorm.load.config import ConfigError, LoadConfig
from mailstorm.load.failif import FailIfError
from mailstorm.load.runner import build_factory
from mailstorm.load.workload import WorkloadError

#: Every option that takes a value, with a valid value for the target of the other tests.
VALUE_OPTIONS = [
    max(action.option_strings, key=len)
    for action in build_parser("mailstorm load")._actions
    if action.option_strings and action.nargs != 0 and action.dest != "help"
]

#: Strings as users mistype them: digits and units, separators, odd Unicode, control bytes.
texts = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"[-+]?[0-9.eE]{0,12}[a-zA-Z%:,µ²]{0,4}(:[0-9.]{0,6})?", fullmatch=True),
    st.text(alphabet="0123456789kmgKMGbB.:,%=<>()ps ", max_size=24),
)


def parse(argv: list[str]) -> LoadConfig | int:
    """What ``main`` does with ``argv`` before it would run: a LoadConfig, or the exit status
    of a usage error after checking that its message is one line."""
    err = io.StringIO()
    parser = build_parser("mailstorm load")
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 2, exc.code
        message = err.getvalue()
        assert message.count("\n") == 1 and "Traceback" not in message, message
        return 2
    try:
        config = config_from_args(args)
        if config.eml is not None or "--from" in argv or "--to" in argv:
            build_factory(config).message(0)  # what main does next, for these options
    except (ConfigError, WorkloadError, FailIfError) as exc:
        assert "\n" not in str(exc), str(exc)
        return 2
    return config


def test_every_value_option_is_covered() -> None:
    assert {"--size", "--fail-if", "--backoff", "--port", "--timeout", "--rate"} <= set(
        VALUE_OPTIONS
    )


@pytest.mark.parametrize("option", VALUE_OPTIONS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_random_option_values_are_a_value_or_a_usage_error(option: str, text: str) -> None:
    result = parse(["127.0.0.1:2525", option, text])
    assert result == 2 or isinstance(result, LoadConfig)


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_random_targets_are_a_target_or_a_usage_error(text: str) -> None:
    result = parse([text] if not text.startswith("-") else ["--", text])
    assert result == 2 or isinstance(result, LoadConfig)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "2g"], "at most 100m"),
        (["--size", "1k:70,2g:1"], "at most 100m"),
        (["--size", "9" * 400], "at most 100m"),
        (["--chunking", "--chunk-size", "5g"], "at most 100m"),
        (["--size", "1k:70,10k"], "missing weight for '10k'"),
        (["--fail-if", "p99(eod) => 50ms"], "did you mean '>='"),
        (["--fail-if", "p99(eod) =< 50ms"], "did you mean '<='"),
        (["--fail-if", "p99(eod) = 50ms"], "use '==' to compare"),
        (["--fail-if", "p99(eod) > 50mss"], "'50mss': a duration is a number with us, ms or s"),
        (["--rcpts", "1000000"], "at most"),
        (["--ehlo", "caf\u00e9\x00"], "bad --ehlo"),
        (["--tls-server-name", ".x"], "bad --tls-server-name"),
        (["--ca-file", "/nonexistent/ca.pem"], "--ca-file"),
        (["--json", "/nonexistent/dir/r.json"], "--json"),
        (["--eml", ""], "--eml"),
        (["--timeout", "1e300"], "at most"),
    ],
)
def test_input_errors_name_the_limit_or_the_right_form(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["127.0.0.1:2525", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1


def test_a_plain_size_and_a_full_mix_are_valid() -> None:
    for size in ("100m", "1k", "1k:70,10k:25,1m:5"):
        args = build_parser("mailstorm load").parse_args(["127.0.0.1:2525", "--size", size])
        assert isinstance(config_from_args(args), LoadConfig)
