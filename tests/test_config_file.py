"""``--config FILE`` and ``--print-config`` of ``mailstorm sink`` and ``mailstorm load``.

The round trip is checked over every option the parsers have, found by walking their actions,
so options added later are covered without editing these tests. Errors are one line naming the
file and the key, with exit status 2. The real runs start the sink and the load generator from
files, on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import wait_for_output
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstorm import configfile
from mailstorm.cliutil import value_type
from mailstorm.load import cli as load_cli
from mailstorm.sink import cli as sink_cli
from mailstorm.sink.config import parse_address

PROCESS_TIMEOUT = 30.0

#: Non-trivial command lines: repeated and IPv6 listeners, faults, sizes, seconds, choices,
#: flags, a count, tuples (--backoff), renamed destinations (--from, --no-tls-resume).
SINK_ARGV = [
    "--listen", "127.0.0.1:2525", "--listen", "[::1]:2526", "--tls-listen", "127.0.0.1:4650",
    "--hostname", "mx.sink.test", "--store", "maildir:./mail", "--max-size", "5m",
    "--max-session-time", "90s", "--min-data-rate", "1k", "--bare-lf", "reject",
    "--command-timeout", "2.5", "--auth-file", "users.txt", "--auth-required",
    "--tls-cert", "cert.pem", "--tls-key", "key.pem", "--insecure-auth",
    "--fault", "EOD:452:every=5", "--fault", "RCPT to=~@reject\\.test:550",
    "--delay", "RCPT:100ms:5%", "--drop", "DATA:1%", "--throttle", "64k",
    "--magic-addresses", "--fault-seed", "7", "--workers", "3", "--stats-interval", "5",
    "-vv", "--metrics-listen", "[::1]:9100", "--proxy-protocol", "--proxy-from", "10.0.0.0/8",
    "--proxy-from", "::1/128", "--proxy-timeout", "3", "--lmtp", "--log-format", "json",
    "--log-events",
]
LOAD_ARGV = [
    "smtp://[::1]:2525", "--sessions", "8", "--messages", "100", "--per-connection", "3",
    "--rate", "50.5", "--ramp-up", "2s", "--procs", "2", "--timeout", "5", "--backoff", "0.2:3",
    "--size", "1k:70,10k:30", "--rcpts", "2", "--from", "bench{n}@a.test", "--to", "u{r}@b.test",
    "--pipelining", "on", "--chunking", "--chunk-size", "4k", "--starttls", "--auth-mech",
    "login", "--ehlo", "client.test", "--source-address", "127.0.0.2", "--source-address",
    "127.0.0.3", "--no-tls-resume", "--tls-server-name", "mx.test", "--fail-if",
    "p99(eod)>50ms", "--quiet", "--progress-interval", "3", "--metrics-listen", "127.0.0.1:9101",
    "--log-format", "json", "--log-level", "warning",
]

Build = Callable[[], argparse.ArgumentParser]
PARSERS: dict[str, tuple[Build, list[str]]] = {
    "sink": (lambda: sink_cli.build_parser("mailstorm sink"), SINK_ARGV),
    "load": (lambda: load_cli.build_parser("mailstorm load"), LOAD_ARGV),
}


def _parse(build: Build, argv: list[str]) -> argparse.Namespace:
    return configfile.parse_args(build(), argv)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """What a run is configured with: everything but the configuration-file options."""
    return {k: v for k, v in vars(args).items() if k not in ("config", "print_config")}


@pytest.mark.parametrize("command", PARSERS)
def test_every_option_is_a_key_and_round_trips(command: str, tmp_path: Path) -> None:
    build, argv = PARSERS[command]
    parser = build()
    args = configfile.parse_args(parser, argv)
    # Every option of the parser (but help, --config, --print-config and hidden ones) is a
    # key: an option of a kind this module does not know would be missing here.
    expected = {
        (next((s for s in a.option_strings if s.startswith("--")), None) or a.dest).lstrip("-")
        for a in parser._actions
        if a.help != argparse.SUPPRESS and a.dest not in ("help", "config", "print_config")
    }
    keys = [o.key for o in configfile.options(parser)]
    assert set(keys) == expected
    text = configfile.render_config(parser, args)
    # Every option with a value is written as a key (none commented out as unwritable),
    # except the load generator's --auth, whose password is never printed.
    for option in configfile.options(parser):
        if getattr(args, option.action.dest) is not None:
            assert re.search(rf"^{re.escape(option.key)} = ", text, re.M), option.key
    saved = tmp_path / "a.toml"
    saved.write_text(text)
    again = _parse(build, ["--config", str(saved)])
    assert _options(again) == _options(args)
    assert configfile.render_config(build(), again) == text


@pytest.mark.parametrize("command", PARSERS)
def test_defaults_round_trip(command: str, tmp_path: Path) -> None:
    build, _ = PARSERS[command]
    argv = ["127.0.0.1:2525"] if command == "load" else []
    args = _parse(build, argv)
    saved = tmp_path / "defaults.toml"
    saved.write_text(configfile.render_config(build(), args))
    assert _options(_parse(build, ["--config", str(saved)])) == _options(args)


def test_options_added_later_work_without_changes(tmp_path: Path) -> None:
    """Other kinds of options, as other features add them, are keys and round trip (the
    names are made up, so that they never clash with real options)."""

    def build() -> argparse.ArgumentParser:
        parser = sink_cli.build_parser("mailstorm sink")
        extra = parser.add_argument_group("added later")
        extra.add_argument("--example-listen", type=value_type(parse_address), metavar="ADDR")
        extra.add_argument("--example-level", choices=("debug", "info"), default="info")
        extra.add_argument("--example-toggle", action=argparse.BooleanOptionalAction)
        extra.add_argument("--example-from", action="append", default=[], metavar="NET")
        return parser

    argv = ["--example-listen", "[::1]:9100", "--example-level", "debug", "--no-example-toggle",
            "--example-from", "10.0.0.0/8"]
    args = _parse(build, argv)
    text = configfile.render_config(build(), args)
    assert "\n# == added later ==\n" in text
    expected = ('example-listen = "[::1]:9100"', 'example-level = "debug"',
                "example-toggle = false")
    for line in expected:
        assert f"\n{line}\n" in text
    saved = tmp_path / "later.toml"
    saved.write_text(text)
    assert _options(_parse(build, ["--config", str(saved)])) == _options(args)
    # and the workers of a supervisor get them too
    assert "--no-example-toggle" in configfile.effective_argv(build(), args)
    saved.write_text('example-from = "127.0.0.1"\nexample-level = "trace"\n')
    with pytest.raises(SystemExit):
        _parse(build, ["--config", str(saved)])


def test_sink_round_trip_through_the_real_cli_gives_the_same_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sink_cli.main([*SINK_ARGV, "--print-config"])
    assert exit_info.value.code == 0
    first = capsys.readouterr().out
    saved = tmp_path / "sink.toml"
    saved.write_text(first)
    with pytest.raises(SystemExit):
        sink_cli.main(["--config", str(saved), "--print-config"])
    assert capsys.readouterr().out == first
    original = sink_cli.config_from_args(_parse(PARSERS["sink"][0], SINK_ARGV))
    restored = sink_cli.config_from_args(_parse(PARSERS["sink"][0], ["--config", str(saved)]))
    assert restored == original


def test_load_plan_round_trip_through_the_real_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_cli.main([*LOAD_ARGV, "--print-config"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("# mailstorm load")
    assert 'target = "smtp://[::1]:2525"' in first
    plan = tmp_path / "plan.toml"
    plan.write_text(first)
    assert load_cli.main(["--config", str(plan), "--print-config"]) == 0
    assert capsys.readouterr().out == first
    original = load_cli.config_from_args(_parse(PARSERS["load"][0], LOAD_ARGV))
    restored = load_cli.config_from_args(_parse(PARSERS["load"][0], ["--config", str(plan)]))
    assert restored == original


def test_print_config_never_prints_a_password(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_cli.main(["127.0.0.1:2525", "--auth", "alice:s3cret", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert re.search(r"^# auth = \(not printed", out, re.M)


def test_command_line_overrides_the_file_and_replaces_its_lists(tmp_path: Path) -> None:
    saved = tmp_path / "sink.toml"
    saved.write_text(
        'listen = ["127.0.0.1:2600", "[::1]:2601"]\nfault = ["EOD:452"]\n'
        'max-size = "1m"\nverbose = 2\nauth-required = true\nhostname = "file.test"\n'
    )
    build = PARSERS["sink"][0]
    from_file = _parse(build, ["--config", str(saved)])
    assert [str(a) for a in from_file.listen] == ["127.0.0.1:2600", "[::1]:2601"]
    assert from_file.fault == ["EOD:452"]
    assert (from_file.max_size, from_file.verbose, from_file.auth_required) == (1 << 20, 2, True)
    both = _parse(build, [
        "--config", str(saved), "--listen", "127.0.0.1:2700", "--max-size", "2m", "-v",
        "--hostname", "cli.test",
    ])
    assert [str(a) for a in both.listen] == ["127.0.0.1:2700"]  # replaced, not appended
    assert both.fault == ["EOD:452"]  # not on the command line: the file's
    assert (both.max_size, both.verbose, both.hostname) == (2 << 20, 1, "cli.test")
    assert both.auth_required is True
    # The order of --config among the options does not matter.
    later = _parse(build, ["--max-size", "2m", "--config", str(saved)])
    assert later.max_size == 2 << 20


def test_a_plan_target_can_be_overridden_and_numbers_or_strings_both_work(
    tmp_path: Path,
) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'target = "127.0.0.1:2525"\nmessages = 50\nsessions = "4"\nchunk-size = 4096\n'
        'timeout = 2\nramp-up = "1.5s"\nno-tls-resume = true\n'
    )
    build = PARSERS["load"][0]
    args = _parse(build, ["--config", str(plan)])
    assert (args.target, args.messages, args.sessions, args.chunk_size) == (
        "127.0.0.1:2525", 50, 4, 4096,
    )
    assert (args.timeout, args.ramp_up, args.tls_resume) == (2.0, 1.5, False)
    assert _parse(build, ["--config", str(plan), "[::1]:25"]).target == "[::1]:25"
    # The load generator's parser takes abbreviations, --config's too.
    assert _parse(build, ["--conf", str(plan)]).messages == 50


def _error(command: str, tmp_path: Path, toml: str | None, capsys: pytest.CaptureFixture[str],
           extra: tuple[str, ...] = ()) -> str:
    """The one line ``mailstorm COMMAND --config FILE`` fails with (exit status 2)."""
    path = tmp_path / f"{command}.toml"
    if toml is not None:
        path.write_text(toml)
    argv = [*extra, "--config", str(path)]
    if command == "sink":
        with pytest.raises(SystemExit) as exit_info:
            sink_cli.main(argv)
        status = exit_info.value.code
    else:
        status = load_cli.main(argv)
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"mailstorm {command}: error: {path}: ")
    return captured.err.removeprefix(f"mailstorm {command}: error: {path}: ").strip()


@pytest.mark.parametrize(
    ("command", "toml", "message"),
    [
        ("sink", "max-sise = 3", "key 'max-sise': unknown option (did you mean 'max-size'?)"),
        ("sink", "worker-report = 1", "key 'worker-report': unknown option"),
        ("sink", "[sink]\nlisten = []", "key 'sink': unknown option"),
        ("sink", 'config = "x.toml"', "key 'config': cannot be set in a configuration file"),
        ("sink", "print-config = true", "key 'print-config': cannot be set"),
        ("sink", "help = true", "key 'help': cannot be set"),
        ("sink", "max-size = true", "key 'max-size': expected a BYTES value"),
        ("sink", 'max-size = "ten"', "key 'max-size': bad size 'ten'"),
        ("sink", "max-size = [1]", "key 'max-size': expected a BYTES value (a string or a number)"
         ", got an array"),
        ("sink", "workers = 0", "key 'workers': '0' must be at least 1"),
        ("sink", "command-timeout = -1", "key 'command-timeout': '-1' must be a non-negative"),
        ("sink", 'bare-lf = "strip"', "key 'bare-lf': invalid choice: 'strip'"),
        ("sink", 'auth-required = "yes"', "key 'auth-required': expected true or false, got "
         '"yes"'),
        ("sink", "verbose = true", "key 'verbose': expected a whole number"),
        ("sink", "listen = [{host = 'a'}]", "key 'listen': expected an array of HOST:PORT values"),
        ("sink", 'listen = ["::1:25"]', "key 'listen': "),
        ("sink", "fault-seed = 1.5", "key 'fault-seed': invalid int value: '1.5'"),
        ("sink", "listen = [", "bad TOML: "),
        ("sink", "max-size = 1\nmax-size = 2", "bad TOML: "),
        ("load", "target = true", "key 'target': expected a TARGET value"),
        ("load", 'target = "127.0.0.1:25"\nsessions = 0', "key 'sessions': '0' must be at least 1"),
        ("load", 'target = "127.0.0.1:25"\npipelining = true', "key 'pipelining': expected"),
        ("load", 'target = "127.0.0.1:25"\nno-tls-resume = 1', "key 'no-tls-resume': expected"),
        ("load", 'target = "127.0.0.1:25"\nsesions = 3', "(did you mean 'sessions'?)"),
    ],
)
def test_bad_files_are_one_line_naming_the_file_and_key(
    command: str, toml: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ("127.0.0.1:25",) if command == "load" and "target" not in toml else ()
    assert message in _error(command, tmp_path, toml, capsys, extra)


#: TOML values of every type, as a hand-written file may hold them.
toml_values = st.recursive(
    st.one_of(
        st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30),
        st.from_regex(r"[0-9.]{1,8}[kmgs]?(:[0-9.]{1,4})?", fullmatch=True),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=2),
    max_leaves=4,
)


@pytest.mark.parametrize("command", PARSERS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_for_any_key_is_used_or_one_line(command: str, data: st.DataObject) -> None:
    build, _ = PARSERS[command]
    keys = [o.key for o in configfile.options(build())] + ["nosuch"]
    table = data.draw(st.dictionaries(st.sampled_from(keys), toml_values, min_size=1,
                                      max_size=3))
    if command == "load":
        table.setdefault("target", "127.0.0.1:2525")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "fuzz.toml")
        path.write_text(tomli_w.dumps(table))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                _parse(build, ["--config", str(path)])
        except SystemExit as exc:
            assert exc.code == 2
            message = err.getvalue()
            assert message.count("\n") == 1 and "Traceback" not in message, message
            assert f": error: {path}: key " in message, message


def test_a_missing_or_binary_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "cannot read: No such file or directory" in _error("sink", tmp_path, None, capsys)
    (tmp_path / "sink.toml").mkdir()
    assert "cannot read: Is a directory" in _error("sink", tmp_path, None, capsys)
    (tmp_path / "sink.toml").rmdir()
    (tmp_path / "sink.toml").write_bytes(b"hostname = \"\xff\"\n")
    assert _error("sink", tmp_path, None, capsys) == "not UTF-8 text"


def test_a_bad_file_through_the_console_command_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "sink.toml"
    bad.write_text("max-size = 10\nmax-sise = 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "mailstorm", "sink", "--config", str(bad)],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"mailstorm sink: error: {bad}: key 'max-sise': unknown option "
        "(did you mean 'max-size'?)\n"
    )


def test_help_explains_both_options() -> None:
    for build, _ in PARSERS.values():
        text = build().format_help()
        assert "--config FILE" in text and "--print-config" in text
        assert "--print-config > saved.toml" in text  # the epilog's example


def test_workers_get_the_effective_options_once() -> None:
    build = PARSERS["sink"][0]
    args = _parse(build, [*SINK_ARGV, "--listen", "127.0.0.1:0"])
    worker = sink_cli._worker_args(configfile.effective_argv(build(), args), [], [])
    assert not any(a.startswith(("--workers", "--listen", "--stats-interval", "--config",
                                 "--metrics-listen")) for a in worker)
    # What a worker parses is what the supervisor was configured with (but its own options).
    own = ("listen", "tls_listen", "workers", "stats_interval", "metrics_listen")
    parsed = _parse(build, worker)
    assert {k: v for k, v in _options(parsed).items() if k not in own} == {
        k: v for k, v in _options(args).items() if k not in own
    }


# --- real runs on loopback ---------------------------------------------------------------




def _start_sink(tmp_path: Path, config: str) -> tuple[subprocess.Popen[bytes], Path, int]:
    """A sink from ``config`` (its relative paths relative to ``tmp_path``), and its port."""
    (tmp_path / "conf").mkdir(exist_ok=True)
    (tmp_path / "conf" / "sink.toml").write_text(config)
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        sink = subprocess.Popen(
            [sys.executable, "-m", "mailstorm", "sink", "--config", "conf/sink.toml"],
            cwd=tmp_path, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        port = int(wait_for_output(log, r"listening on 127\.0\.0\.1:(\d+)").group(1))
    except BaseException:
        _stop(sink)
        raise
    return sink, log, port


def _stop(sink: subprocess.Popen[bytes]) -> None:
    if sink.poll() is None:
        sink.send_signal(signal.SIGTERM)
        try:
            sink.wait(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(sink.pid, signal.SIGKILL)
            sink.wait()


def _send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=PROCESS_TIMEOUT) as client:
        client.sendmail("a@example.com", ["b@example.com"], "Subject: hi\r\n\r\nbody\r\n")


def test_sink_and_load_run_from_files(tmp_path: Path) -> None:
    sink, log, port = _start_sink(
        tmp_path,
        'listen = ["127.0.0.1:0"]\nstore = "maildir:mail"\nhostname = "from-file.test"\n'
        'max-size = "1m"\n',
    )
    try:
        _send(port)
        # maildir:mail is relative to the working directory, not to conf/.
        assert len(os.listdir(tmp_path / "mail" / "new")) == 1
        plan = tmp_path / "plan.toml"
        plan.write_text(
            f'target = "127.0.0.1:{port}"\nsessions = 2\nmessages = 5\nquiet = true\n'
            'size = "2k"\njson = "run.json"\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "mailstorm", "load", "--config", str(plan)],
            cwd=tmp_path, capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads((tmp_path / "run.json").read_text())
        assert report["totals"]["delivered"] == 5, report["totals"]
        assert len(os.listdir(tmp_path / "mail" / "new")) == 6
        stored = next((tmp_path / "mail" / "new").iterdir()).read_text()
        assert "from-file.test" in stored
    finally:
        _stop(sink)
    assert sink.returncode == 0, log.read_text()


def test_workers_from_a_file(tmp_path: Path) -> None:
    sink, log, port = _start_sink(
        tmp_path,
        'listen = ["127.0.0.1:0"]\nworkers = 2\nstore = "maildir:mail"\n'
        'hostname = "workers.test"\n',
    )
    try:
        wait_for_output(log, r"2 workers serving")
        _send(port)
        stored = next((tmp_path / "mail" / "new").iterdir()).read_text()
        assert "workers.test" in stored
    finally:
        _stop(sink)
    assert sink.returncode == 0, log.read_text()
    assert log.read_text().count("listening on") == 1
