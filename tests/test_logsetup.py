"""``mailstorm.logsetup``: the JSON formatter (one object per line, whatever the values) and
the ``--log-format``/``--log-level``/``-v``/``-q`` options."""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys

import pytest

from mailstorm.cliutil import OneLineErrorParser
from mailstorm.logsetup import (
    JsonFormatter,
    add_logging_options,
    configure_logging,
    level_from_args,
)


def _record(message: str, *args: object, level: int = logging.INFO, **extra: object) -> str:
    logger = logging.getLogger("mailstorm.test")
    record = logger.makeRecord(
        logger.name, level, __file__, 1, message, args, None, extra=extra or None
    )
    return JsonFormatter().format(record)


def test_a_record_is_one_object_with_the_fixed_keys_first() -> None:
    line = _record("hello %s", "world", event="greeting", session="S1", size=12)
    entry = json.loads(line)
    assert list(entry)[:5] == ["time", "level", "logger", "event", "message"]
    assert entry["level"] == "info"
    assert entry["logger"] == "mailstorm.test"
    assert entry["event"] == "greeting"
    assert entry["message"] == "hello world"
    assert entry["session"] == "S1"
    assert entry["size"] == 12
    # RFC 3339, UTC, milliseconds.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])


def test_a_record_without_an_event_is_a_plain_log_line() -> None:
    entry = json.loads(_record("just words", level=logging.WARNING))
    assert entry["event"] == "log"
    assert entry["level"] == "warning"


@pytest.mark.parametrize(
    "hostile",
    ["two\nlines", "cr\rlf\r\n", "nul\x00", "sep\u2028\u2029", "tab\tesc\x1b[31m", '"}{"'],
)
def test_no_value_can_break_the_one_line_rule(hostile: str) -> None:
    line = _record("message %s", hostile, event="x", user=hostile, **{"weird key\n": hostile})
    # ASCII only, no control character: nothing a line splitter (str.splitlines included)
    # could cut.
    assert line.isascii()
    assert len(line.splitlines()) == 1
    assert all(ch >= " " for ch in line)
    entry = json.loads(line)
    assert entry["message"] == f"message {hostile}"
    assert entry["user"] == hostile
    assert entry["weird key\n"] == hostile


def test_values_json_cannot_hold_are_written_as_text() -> None:
    entry = json.loads(_record("x", event="x", data=b"\x01bytes", pair=("a", 1), obj=object()))
    assert entry["data"] == "b'\\x01bytes'"
    assert entry["pair"] == ["a", 1]
    assert entry["obj"].startswith("<object object")


def test_an_exception_stays_on_the_line() -> None:
    logger = logging.getLogger("mailstorm.test")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert len(line.splitlines()) == 1
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert "Traceback" in entry["exception"]
    assert "ValueError: bad\nthing" in entry["exception"]


def test_configure_logging_writes_json_lines_at_the_level_asked() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("json", logging.WARNING, stream=stream)
        configure_logging("json", logging.WARNING, stream=stream)  # no doubled lines
        log = logging.getLogger("mailstorm.test.configure")
        log.info("not shown")
        log.warning("shown", extra={"event": "w"})
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["w"]


def test_text_format_keeps_the_time_and_message_look() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("text", logging.INFO, stream=stream)
        logging.getLogger("mailstorm.test.text").info("plain %d", 1, extra={"event": "x"})
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    assert re.fullmatch(r"\d\d:\d\d:\d\d plain 1\n", stream.getvalue())


def _parser(aliases: bool = True) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="prog")
    add_logging_options(parser, default_level="info", aliases=aliases)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    return parser


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        ([], logging.INFO),
        (["--log-level", "debug"], logging.DEBUG),
        (["--log-level", "warning"], logging.WARNING),
        (["--log-level", "error"], logging.ERROR),
        (["-q"], logging.ERROR),
        (["-v"], logging.DEBUG),
        (["-vv"], logging.DEBUG),
    ],
)
def test_levels_and_their_aliases(argv: list[str], level: int) -> None:
    parser = _parser()
    assert level_from_args(parser.parse_args(argv), parser, default_level="info") == level


@pytest.mark.parametrize("argv", [["--log-level", "info", "-q"], ["-v", "--log-level", "error"],
                                  ["-q", "-v"]])
def test_aliases_that_contradict_are_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = _parser()
    with pytest.raises(SystemExit) as exit_info:
        level_from_args(parser.parse_args(argv), parser, default_level="info")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be combined" in err


def test_without_aliases_q_and_v_mean_something_else() -> None:
    parser = _parser(aliases=False)
    args = parser.parse_args(["-q", "--log-level", "warning"])
    assert level_from_args(args, parser, default_level="info", aliases=False) == logging.WARNING


def test_a_bad_value_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["--log-format", "xml"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--log-format" in err
