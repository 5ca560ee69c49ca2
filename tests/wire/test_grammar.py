"""The RFC 5321 4.1.2 grammar: paths, quoted local parts, literals, parameters."""

from __future__ import annotations

import pytest

from mailstorm.wire.grammar import COMMAND, MAIL_ARGS, RCPT_ARGS, DuplicateParameter, parse_path


@pytest.mark.parametrize(
    ("arg", "mailbox", "params"),
    [
        ("FROM:<a@b.example>", "a@b.example", {}),
        ("from:<A.B+c@Example.COM>", "A.B+c@Example.COM", {}),
        ("FROM: <a@b>", "a@b", {}),
        ("FROM:<>", "", {}),
        ('FROM:<"john \\"q\\" doe"@x.org>', '"john \\"q\\" doe"@x.org', {}),
        ("FROM:<@relay1.example,@relay2.example:u@d.example>", "u@d.example", {}),
        ("FROM:<u@[192.0.2.1]>", "u@[192.0.2.1]", {}),
        ("FROM:<u@[IPv6:2001:db8::1]>", "u@[IPv6:2001:db8::1]", {}),
        ("FROM:<a@b> SIZE=1000 BODY=8BITMIME", "a@b", {"SIZE": "1000", "BODY": "8BITMIME"}),
        ("FROM:<a@b> smtputf8", "a@b", {"SMTPUTF8": None}),
        ("FROM:<a@b> AUTH=<>", "a@b", {"AUTH": "<>"}),
        ("FROM:<用户@例子.广告> SMTPUTF8", "用户@例子.广告", {"SMTPUTF8": None}),
    ],
)
def test_mail_arguments(arg: str, mailbox: str, params: dict[str, str | None]) -> None:
    m = MAIL_ARGS.fullmatch(arg)
    assert m is not None
    path = parse_path(m)
    assert (path.mailbox, path.params) == (mailbox, params)


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:a@b",  # no angle brackets
        "FROM:<a@b",
        "FROM:<a b@c>",
        "FROM:<a@b> SIZE=",
        "FROM:<a@-b>",
        "FROM:<a@b->",
        "FROM:<a..b@c>",
        "FROM:<.a@c>",
        "FROM:<a@[300.1.1.1]>",
        "FROM:<a@>",
        "FROM:<@b>",
        "FROM:<a@b> =x",
        "TO:<a@b>",
        "FROM:<\"unterminated@x>",
    ],
)
def test_bad_mail_arguments(arg: str) -> None:
    assert MAIL_ARGS.fullmatch(arg) is None


def test_rcpt_postmaster_and_paths() -> None:
    m = RCPT_ARGS.fullmatch("TO:<Postmaster>")
    assert m is not None and parse_path(m).mailbox == "Postmaster"
    m = RCPT_ARGS.fullmatch("to:<postmaster@x.example> NOTIFY=NEVER")
    assert m is not None and parse_path(m).params == {"NOTIFY": "NEVER"}
    assert RCPT_ARGS.fullmatch("TO:<>") is None


def test_duplicate_parameters() -> None:
    m = MAIL_ARGS.fullmatch("FROM:<a@b> SIZE=1 size=2")
    assert m is not None
    with pytest.raises(DuplicateParameter):
        parse_path(m)


def test_command_line_split() -> None:
    m = COMMAND.fullmatch("mail FROM:<a@b>")
    assert m is not None and m.groups() == ("mail", "FROM:<a@b>")
    m = COMMAND.fullmatch("QUIT")
    assert m is not None and m.groups() == ("QUIT", None)
    assert COMMAND.fullmatch("12 x") is None


def test_pathological_input_is_fast_to_refuse() -> None:
    # No catastrophic backtracking: these fail in microseconds (no timing asserted; a
    # regression would hang the test suite visibly).
    assert MAIL_ARGS.fullmatch("FROM:<" + "a" * 300 + "@" + "b-" * 200 + "!>") is None
    assert MAIL_ARGS.fullmatch("FROM:<a@" + "b." * 200 + "->") is None
    assert MAIL_ARGS.fullmatch('FROM:<"' + "\\a" * 200) is None


def test_character_classes_equal_the_rfc_sets() -> None:
    """The negated classes admit exactly the RFC 5321/6531 sets (ASCII rules, all non-ASCII)."""
    import re
    import string

    from mailstorm.wire import grammar

    alnum = set(string.ascii_letters + string.digits)
    expected_sets = {
        grammar._ATEXT: alnum | set("!#$%&'*+-/=?^_`{|}~"),
        grammar._LET_DIG: alnum,
        grammar._LDH: alnum | {"-"},
        # qtextSMTP: %d32-33 / %d35-91 / %d93-126
        grammar._QUOTED_STRING: {chr(c) for c in [32, 33, *range(35, 92), *range(93, 127)]},
    }
    for pattern, ascii_set in expected_sets.items():
        if pattern == grammar._QUOTED_STRING:
            def matches(ch: str) -> bool:
                return re.fullmatch(grammar._QUOTED_STRING, f'"{ch}"') is not None
        else:
            compiled = re.compile(pattern)

            def matches(ch: str, compiled: re.Pattern[str] = compiled) -> bool:
                return compiled.fullmatch(ch) is not None

        for cp in [*range(0x800), 0xFFFD, 0x10000, 0x10FFFF]:
            ch = chr(cp)
            assert matches(ch) == (ch in ascii_set or cp >= 0x80), (pattern, hex(cp))
