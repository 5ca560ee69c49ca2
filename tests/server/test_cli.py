"""The command line as an operator meets it: ``mailstorm sink`` / ``python -m mailstorm.sink``
run as real processes.

Bad input must give exit status 2 (1 when a listener cannot bind) and exactly one clear line
on stderr, never a traceback or a usage dump, and never a secret from the auth file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trustme
from conftest import TEST_TIMEOUT, SMTPClient, TLSFiles, b64

from mailstorm import ports
from mailstorm.sink import SinkServer

Connect = Callable[..., Awaitable[SMTPClient]]
StartSink = Callable[..., Awaitable[SinkServer]]

#: Bound on each child process (start-up of a Python process on a loaded machine).
PROCESS_TIMEOUT = 60.0

MAILSTORM = shutil.which("mailstorm")
needs_console_script = pytest.mark.skipif(
    MAILSTORM is None, reason="the 'mailstorm' console script is not installed (pip install -e .)"
)


def sink_command(launcher: str) -> list[str]:
    if launcher == "mailstorm sink":
        assert MAILSTORM is not None
        return [MAILSTORM, "sink"]
    return [sys.executable, "-m", "mailstorm.sink"]


def run_sink(*args: str, launcher: str = "mailstorm sink") -> subprocess.CompletedProcess[str]:
    """Run the sink with ``args``; it is expected to exit on its own (bad input)."""
    return subprocess.run(
        [*sink_command(launcher), *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], status: int, *fragments: str, launcher: str
) -> str:
    """Exit status ``status`` and exactly one stderr line, naming the program and the problem."""
    lines = result.stderr.splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"{launcher}: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    assert result.stdout == ""
    return line


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    return ports.free_port()


# ---- bad input: one line, status 2 ---------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def mismatched_pair(tmp_path: Path) -> list[str]:
    """Options naming a certificate and the private key of a different certificate."""
    ca = trustme.CA()
    first, second = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    cert, key = tmp_path / "first.pem", tmp_path / "second.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in first.cert_chain_pems))
    second.private_key_pem.write_to_path(str(key))
    return ["--tls-cert", str(cert), "--tls-key", str(key)]


CASES: dict[str, tuple[Callable[[Path, TLSFiles], list[str]], tuple[str, ...]]] = {
    "missing cert": (
        lambda tmp, tls: ["--tls-cert", str(tmp / "nope.pem"), "--tls-key", str(tls.key)],
        ("nope.pem", "no such file"),
    ),
    "cert is a directory": (
        lambda tmp, tls: ["--tls-cert", str(tmp), "--tls-key", str(tls.key)],
        ("certificate", "Is a directory"),
    ),
    "cert is not PEM": (
        lambda tmp, tls: [
            "--tls-cert",
            str(_write(tmp / "junk.pem", "not a certificate\n")),
            "--tls-key",
            str(tls.key),
        ],
        ("junk.pem",),
    ),
    "missing key": (
        lambda tmp, tls: ["--tls-cert", str(tls.cert), "--tls-key", str(tmp / "nokey.pem")],
        ("nokey.pem", "no such file"),
    ),
    "cert without its key": (
        lambda tmp, tls: ["--tls-cert", str(tls.cert)],
        ("cert.pem",),
    ),
    "cert/key mismatch": (
        lambda tmp, tls: mismatched_pair(tmp),
        ("first.pem", "second.key"),
    ),
    "key without cert": (
        lambda tmp, tls: ["--tls-key", str(tls.key)],
        ("--tls-key", "--tls-cert"),
    ),
    "tls-listen without cert": (
        lambda tmp, tls: ["--tls-listen", "127.0.0.1:0"],
        ("--tls-listen", "--tls-cert"),
    ),
    "missing auth file": (
        lambda tmp, tls: ["--auth-file", str(tmp / "users.missing")],
        ("users.missing", "cannot read"),
    ),
    "auth-required without auth file": (
        lambda tmp, tls: ["--auth-required"],
        ("--auth-required", "--auth-file"),
    ),
    "bad listen": (lambda tmp, tls: ["--listen", "localhost"], ("--listen", "'localhost'")),
    "bad listen port": (lambda tmp, tls: ["--listen", "127.0.0.1:99999"], ("--listen", "port")),
    "bad max-size": (lambda tmp, tls: ["--max-size", "ten"], ("--max-size", "'ten'")),
    "negative max-recipients": (
        lambda tmp, tls: ["--max-recipients", "-1"],
        ("--max-recipients",),
    ),
    "bad store kind": (lambda tmp, tls: ["--store", "foo:bar"], ("'foo:bar'", "unknown kind")),
    "maildir is a file": (
        lambda tmp, tls: ["--store", f"maildir:{_write(tmp / 'plain.txt', 'x')}"],
        ("plain.txt", "not a directory"),
    ),
    "maildir without path": (lambda tmp, tls: ["--store", "maildir:"], ("missing path",)),
    "negative max-connections-per-ip": (
        lambda tmp, tls: ["--max-connections-per-ip", "-1"],
        ("--max-connections-per-ip",),
    ),
    "negative max-session-time": (
        lambda tmp, tls: ["--max-session-time", "-5"],
        ("--max-session-time",),
    ),
    "bad min-data-rate": (
        lambda tmp, tls: ["--min-data-rate", "fast"],
        ("--min-data-rate", "'fast'"),
    ),
    "bad max-junk-commands": (
        lambda tmp, tls: ["--max-junk-commands", "many"],
        ("--max-junk-commands", "'many'"),
    ),
    "negative max-auth-failures": (
        lambda tmp, tls: ["--max-auth-failures", "-3"],
        ("--max-auth-failures",),
    ),
}


@needs_console_script
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_status_2(
    case: str, tmp_path: Path, tls_files: TLSFiles
) -> None:
    """Each unusable setting is refused before listening: status 2, one line naming it."""
    make_args, fragments = CASES[case]
    args = make_args(tmp_path, tls_files)
    result = run_sink("--listen", "127.0.0.1:0", *args)
    assert_one_line_error(result, 2, *fragments, launcher="mailstorm sink")
    assert "Traceback" not in result.stderr


@needs_console_script
@pytest.mark.parametrize("case", ["cert is not PEM", "cert without its key"])
def test_unusable_cert_message_is_plain_language(
    case: str, tmp_path: Path, tls_files: TLSFiles
) -> None:
    """The one line for an unusable certificate says what is wrong in the operator's words,
    not as an OpenSSL source location."""
    make_args, _ = CASES[case]
    result = run_sink("--listen", "127.0.0.1:0", *make_args(tmp_path, tls_files))
    line = assert_one_line_error(result, 2, launcher="mailstorm sink")
    assert "_ssl.c" not in line and "PEM lib" not in line


@pytest.mark.parametrize(
    ("lines", "number", "secret"),
    [
        (["# users", "alice:wonderland", "alice:topsecret-42"], 3, "topsecret-42"),
        (["alice:wonderland", "", "justapasswordpastedhere"], 3, "justapasswordpastedhere"),
        (
            ["alice:wonderland", "carol:$scrypt$ln=99,r=8,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNo"],
            2,
            "c2FsdHNhbHRzYWx0",
        ),
        (["alice:wonderland", "dave:"], 2, "dave:"),
    ],
    ids=["duplicate user", "no colon", "bad scrypt hash", "empty password"],
)
def test_bad_auth_file_line(tmp_path: Path, lines: list[str], number: int, secret: str) -> None:
    """A bad auth file line is reported with its line number, and the secret never appears."""
    path = tmp_path / "users.txt"
    path.write_text("\n".join(lines) + "\n")
    result = run_sink(
        "--listen", "127.0.0.1:0", "--auth-file", str(path), launcher="python -m mailstorm.sink"
    )
    line = assert_one_line_error(
        result, 2, f"line {number}", str(path), launcher="python -m mailstorm.sink"
    )
    assert secret not in line
    assert "wonderland" not in line


@needs_console_script
@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file whatever its mode")
def test_cert_without_read_permission(tmp_path: Path, tls_files: TLSFiles) -> None:
    """A certificate the sink may not read: status 2, one line naming it."""
    cert = tmp_path / "cert.pem"
    cert.write_bytes(tls_files.cert.read_bytes())
    cert.chmod(0)
    result = run_sink(
        "--listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(tls_files.key)
    )
    assert_one_line_error(result, 2, str(cert), "permission denied", launcher="mailstorm sink")


def test_port_in_use(free_port: int) -> None:
    """A port another socket holds: status 1 and one line saying 'address already in use'."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port))
        holder.listen()
        result = run_sink("--listen", f"127.0.0.1:{free_port}", launcher="python -m mailstorm.sink")
    line = assert_one_line_error(
        result, 1, "address already in use", f"127.0.0.1:{free_port}",
        launcher="python -m mailstorm.sink",
    )
    assert "Traceback" not in line


def test_tls_port_in_use(free_port: int, tls_files: TLSFiles) -> None:
    """The same for an implicit-TLS listener."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port))
        holder.listen()
        result = run_sink(
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            str(tls_files.cert),
            "--tls-key",
            str(tls_files.key),
            "--tls-listen",
            f"127.0.0.1:{free_port}",
            launcher="python -m mailstorm.sink",
        )
    assert_one_line_error(result, 1, "address already in use", launcher="python -m mailstorm.sink")


# ---- help ------------------------------------------------------------------------------------

OPTIONS = [
    "--listen",
    "--tls-listen",
    "--hostname",
    "--store",
    "--max-size",
    "--max-recipients",
    "--max-connections",
    "--max-errors",
    "--max-connections-per-ip",
    "--max-junk-commands",
    "--max-session-time",
    "--min-data-rate",
    "--max-auth-failures",
    "--auth-file",
    "--auth-required",
    "--tls-cert",
    "--tls-key",
    "--insecure-auth",
    "--bare-lf",
    "--command-timeout",
    "--data-timeout",
    "--stats-interval",
    "--grace-period",
]


@needs_console_script
@pytest.mark.parametrize("launcher", ["mailstorm sink", "python -m mailstorm.sink"])
def test_sink_help(launcher: str) -> None:
    """``--help`` exits 0 and documents every option (the spec's list and the parser's own)."""
    from mailstorm.sink.cli import build_parser

    result = subprocess.run(
        [*sink_command(launcher), "--help"],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    text = result.stdout
    assert text.startswith(f"usage: {launcher}")
    parser_options = {
        option
        for action in build_parser()._actions
        for option in action.option_strings
        # Suppressed options are internal (the --workers supervisor's), not for users.
        if option.startswith("--") and action.help != argparse.SUPPRESS
    }
    for option in sorted(set(OPTIONS) | parser_options):
        assert option in text, option
    for word in ("discard", "maildir:DIR", "mbox:FILE", "exit status"):
        assert word in text, word


#: Every limit flag, and the config field it sets.
LIMIT_FLAGS = {
    "--max-size": "max_size",
    "--max-recipients": "max_recipients",
    "--max-connections": "max_connections",
    "--max-connections-per-ip": "max_connections_per_ip",
    "--max-errors": "max_errors",
    "--max-junk-commands": "max_junk_commands",
    "--max-auth-failures": "max_auth_failures",
    "--max-session-time": "max_session_time",
    "--min-data-rate": "min_data_rate",
}


def test_limit_help_says_zero_means_no_limit() -> None:
    """Each limit's help line says what 0 means, and so does the epilog."""
    from mailstorm.sink.cli import build_parser

    parser = build_parser()
    helps = {
        option: action.help or ""
        for action in parser._actions
        for option in action.option_strings
    }
    for flag in LIMIT_FLAGS:
        assert "0 = no limit" in helps[flag] or "0 = off" in helps[flag], flag
    assert '0 means "no limit"' in (parser.epilog or "")


def test_limit_flags_set_the_config() -> None:
    """Every limit flag reaches its ``SinkConfig`` field, 0 included (0 means no limit, so it
    must not be turned into anything else on the way)."""
    from mailstorm.sink.cli import build_parser, config_from_args

    parser = build_parser()
    for value in ("0", "7"):
        argv = [arg for flag in LIMIT_FLAGS for arg in (flag, value)]
        config = config_from_args(parser.parse_args(argv))
        for flag, field in LIMIT_FLAGS.items():
            assert getattr(config, field) == int(value), (flag, getattr(config, field))
    config = config_from_args(parser.parse_args(["--min-data-rate", "1k"]))
    assert config.min_data_rate == 1024.0


def test_new_limit_defaults() -> None:
    """The defaults of the new limits, the same from the command line and from code."""
    from mailstorm.sink import SinkConfig
    from mailstorm.sink.cli import build_parser, config_from_args

    expected = {
        "max_connections_per_ip": 0,
        "max_session_time": 3600.0,
        "min_data_rate": 256.0,
        "max_junk_commands": 100,
        "max_auth_failures": 10,
    }
    from_cli = config_from_args(build_parser().parse_args([]))
    for field, value in expected.items():
        assert getattr(SinkConfig(), field) == value, field
        assert getattr(from_cli, field) == value, field


@pytest.mark.parametrize("field", sorted(LIMIT_FLAGS.values()))
def test_config_refuses_negative_limits(field: str) -> None:
    """Code embedding the sink gets the same check as the command line."""
    from mailstorm.sink import SinkConfig

    with pytest.raises(ValueError, match=field):
        SinkConfig(**{field: -1})  # type: ignore[arg-type]


@needs_console_script
def test_mailstorm_help() -> None:
    """``mailstorm --help`` exits 0 and names the subcommands; an unknown one exits 2."""
    assert MAILSTORM is not None
    result = subprocess.run(
        [MAILSTORM, "--help"], capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    for command in ("sink", "load", "passwd"):
        assert command in result.stdout
    bogus = subprocess.run(
        [MAILSTORM, "no-such-command"], capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )
    assert bogus.returncode == 2
    assert "no-such-command" in bogus.stderr


# ---- mailstorm passwd ----------------------------------------------------------------------


@needs_console_script
async def test_passwd_line_is_accepted_by_sink(
    tmp_path: Path, start_sink: StartSink, connect: Connect
) -> None:
    """``mailstorm passwd`` reads the password from stdin and prints ``user:$scrypt$...``; a
    sink using that line accepts the password (PLAIN and LOGIN) and refuses another."""
    assert MAILSTORM is not None
    password = " open: sesame "  # spaces and a colon are part of the password
    with trio.fail_after(PROCESS_TIMEOUT):
        result = await trio.run_process(
            [MAILSTORM, "passwd", "--ln", "4", "carol"],
            stdin=(password + "\n").encode(),
            capture_stdout=True,
            capture_stderr=True,
        )
    line = result.stdout.decode()
    assert line.startswith("carol:$scrypt$ln=4,"), line
    assert password.strip() not in line
    auth_file = tmp_path / "users.txt"
    auth_file.write_text("alice:wonderland\n" + line)

    server = await start_sink(auth_file=str(auth_file))
    client = await connect(server.addresses[0])
    await client.cmd("EHLO client.test")
    reply = await client.cmd("AUTH PLAIN " + b64(f"\0carol\0{password}"))
    assert (reply.code, reply.enhanced) == (235, "2.7.0"), reply

    other = await connect(server.addresses[0])
    await other.cmd("EHLO client.test")
    reply = await other.cmd("AUTH PLAIN " + b64("\0carol\0open: sesame"))
    assert (reply.code, reply.enhanced) == (535, "5.7.8"), reply
    assert (await other.cmd("AUTH LOGIN")).code == 334
    assert (await other.cmd(b64("carol"))).code == 334
    assert (await other.cmd(b64(password))).code == 235


# ---- start-up warning ------------------------------------------------------------------------


async def start_and_read_banner(args: list[str]) -> tuple[int, str]:
    """Start ``python -m mailstorm.sink args`` on a free port, read stderr up to the
    'listening' line, then SIGTERM it. Returns the exit status and the stderr text."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mailstorm.sink", "--listen", "127.0.0.1:0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    text = b""
    try:
        with trio.fail_after(PROCESS_TIMEOUT):
            while b"listening on" not in text:
                chunk = await process.stderr.receive_some(4096)
                if not chunk:
                    break
                text += chunk
            process.send_signal(signal.SIGTERM)
            async for chunk in process.stderr:
                text += chunk
            status = await process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            with trio.move_on_after(TEST_TIMEOUT):
                await process.wait()
        await process.stderr.aclose()
    return status, text.decode(errors="replace")


async def test_warning_when_auth_without_tls(tmp_path: Path, auth_file: Path) -> None:
    """An auth file without TLS makes the sink warn at start-up that passwords travel in
    plaintext; it still starts and exits 0 on SIGTERM."""
    status, text = await start_and_read_banner(["--auth-file", str(auth_file)])
    assert status == 0, text
    assert "listening on" in text
    warnings = [line for line in text.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, text
    assert "plaintext" in warnings[0] and "TLS" in warnings[0]
    assert "wonderland" not in text


async def test_no_warning_with_tls(auth_file: Path, tls_files: TLSFiles) -> None:
    """With a certificate configured there is no plaintext-AUTH warning."""
    status, text = await start_and_read_banner(
        [
            "--auth-file",
            str(auth_file),
            "--tls-cert",
            str(tls_files.cert),
            "--tls-key",
            str(tls_files.key),
        ]
    )
    assert status == 0, text
    assert "listening on" in text
    assert "warning" not in text.lower()
