"""SMTP load through Locust: SMTPUser, its request events, the locustfile, master and workers.

Locust monkey-patches the process it runs in (gevent), so Locust itself runs in subprocesses
here: headless, a few seconds, on loopback, against a sink in this process (``SinkThread``).
Every check is a count: Locust's successful ``end of data`` requests, from its ``--csv``
files, against the messages the sink stored. The phase reporter is tested in this process
(it does not import locust) over a real ``BlockingSession``.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import mailstorm.load
from mailstorm.load.blocking import BlockingSession
from mailstorm.load.locust_report import PhaseReporter
from mailstorm.ports import free_port
from mailstorm.sink import SinkThread
from mailstorm.wire.client import ClientConfig

# Not importorskip: importing locust monkey-patches this process (and every later test in it).
if importlib.util.find_spec("locust") is None:
    pytest.skip("the 'locust' extra is not installed", allow_module_level=True)

LOCUSTFILE = Path(mailstorm.load.__file__).parent / "locustfile.py"
#: Bounds every Locust process: a run of a few seconds plus start-up and a graceful stop.
PROCESS_TIMEOUT = 90


def locust_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args]


def run_headless(
    sink: SinkThread, out: Path, *args: str, scheme: str = "smtp"
) -> subprocess.CompletedProcess[str]:
    """One headless Locust process against ``sink`` for 3 s; CSV files at ``out``_*.csv."""
    return subprocess.run(
        locust_command(
            "--headless",
            "--host",
            f"{scheme}://{sink.host}:{sink.port}",
            "--run-time",
            "3s",
            "--csv",
            str(out),
            "--only-summary",
            *args,
        ),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )


def read_stats(out: Path) -> dict[str, dict[str, int]]:
    """Requests and failures per event name, from Locust's ``_stats.csv``."""
    with open(f"{out}_stats.csv", newline="") as f:
        return {
            row["Name"]: {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
            }
            for row in csv.DictReader(f)
            if row["Type"] == "SMTP"
        }


def read_failures(out: Path) -> dict[tuple[str, str], int]:
    """Occurrences per (event name, error), from Locust's ``_failures.csv``."""
    with open(f"{out}_failures.csv", newline="") as f:
        return {(row["Name"], row["Error"]): int(row["Occurrences"]) for row in csv.DictReader(f)}


def stored(maildir: Path) -> int:
    return sum(1 for _ in (maildir / "new").iterdir())


def successes(stats: dict[str, dict[str, int]], name: str = "end of data") -> int:
    return stats[name]["requests"] - stats[name]["failures"]


# -- the phase reporter, in this process ------------------------------------------------------


class Recorder:
    """Stands in for ``environment.events.request.fire``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, **event: Any) -> None:
        self.events.append(event)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["name"] == name]


def send_three(sink: SinkThread, pipelining: str) -> Recorder:
    recorder = Recorder()
    reporter = PhaseReporter(recorder)
    session = BlockingSession(
        sink.host, sink.port, config=ClientConfig(pipelining=pipelining), on_phase=reporter.phase
    )
    session.connect()
    assert session.conn is not None
    reporter.pipelining = session.conn.pipelining
    for n in range(3):
        reporter.message_size = 100 + n
        session.send("a@x.test", [f"b{n}@y.test"], b"Subject: x\r\n\r\nhi\r\n")
        reporter.flush()
    session.quit()
    return recorder


def test_one_event_per_phase_and_refusals_carry_their_code() -> None:
    with SinkThread(faults=["RCPT:550:every=3", "EOD:452:every=2"]) as sink:
        unpipelined = send_three(sink, "off")
        pipelined = send_three(sink, "on")
    # Without pipelining: every reply is its own event, all of request type SMTP.
    assert {e["request_type"] for e in unpipelined.events} == {"SMTP"}
    assert [e["name"] for e in unpipelined.events] == [
        "banner", "EHLO",
        "MAIL", "RCPT", "DATA", "end of data",  # 1st message: stored
        "MAIL", "RCPT", "DATA", "end of data",  # 2nd: 452 to its end of data
        "MAIL", "RCPT", "RSET",  # 3rd: 550 to RCPT, the transaction reset
        "QUIT",
    ]  # fmt: skip
    eod = unpipelined.named("end of data")
    assert [e["exception"] is None for e in eod] == [True, False]
    assert str(eod[1]["exception"]).startswith("452 4.3.1 ")
    assert [e["response_length"] for e in eod] == [100, 101]
    rcpt_error = unpipelined.named("RCPT")[2]["exception"]
    assert str(rcpt_error).startswith("550 5.1.1 ")
    # With pipelining, MAIL, RCPT and DATA are one event; a refusal in it names its phase.
    # (The sink's counts go on: its 4th end of data gets 452, its 6th RCPT gets 550.)
    assert [e["name"] for e in pipelined.events] == [
        "banner", "EHLO",
        "MAIL+RCPT+DATA", "end of data",
        "MAIL+RCPT+DATA", "end of data",
        "MAIL+RCPT+DATA", "RSET",
        "QUIT",
    ]  # fmt: skip
    groups = pipelined.named("MAIL+RCPT+DATA")
    assert [e["exception"] is None for e in groups] == [True, True, False]
    assert str(groups[2]["exception"]).startswith("RCPT 550 5.1.1 ")
    assert [e["exception"] is None for e in pipelined.named("end of data")] == [True, False]
    assert all(e["response_time"] >= 0 for e in pipelined.events + unpipelined.events)


# -- Locust itself, in subprocesses -----------------------------------------------------------


def test_headless_run_counts_what_the_sink_stored(tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    out = tmp_path / "run"
    with SinkThread(store=f"maildir:{maildir}") as sink:
        done = run_headless(
            sink,
            out,
            "-u", "3", "-r", "3",
            "--rcpts", "2",
            "--rcpt-to", "u{n}-{r}@rcpt.test",
            "--size", "1k:1,4k:1",
            "--per-connection", "7",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        records = sink.messages
    stats = read_stats(out)
    assert successes(stats) == stored(maildir) > 0
    assert all(v["failures"] == 0 for v in stats.values()), stats
    # One connection per user for every 7 messages, each QUIT politely.
    assert stats["connect"]["requests"] == stats["QUIT"]["requests"] >= 2
    # The workload options reached the users: two recipients from the template, both sizes.
    assert all(len(r.rcpt_tos) == 2 and r.rcpt_tos[1].endswith("-2@rcpt.test") for r in records)
    assert {round(len(r.raw) / 1024) for r in records} == {1, 4}  # headers vary a little


def test_lmtp_host_against_an_lmtp_sink(tmp_path: Path) -> None:
    """``--host lmtp://``: LHLO, and an ``end of data`` request per recipient's reply (RFC
    2033: each is a delivery to one mailbox), for the one message the sink stores."""
    maildir = tmp_path / "mail"
    out = tmp_path / "run"
    with SinkThread(store=f"maildir:{maildir}", lmtp=True) as sink:
        done = run_headless(sink, out, "-u", "2", "-r", "2", "--rcpts", "3", scheme="lmtp")
        assert done.returncode == 0, done.stderr[-3000:]
        records = sink.messages
    stats = read_stats(out)
    assert "LHLO" in stats, stats
    assert successes(stats) == 3 * stored(maildir) > 0
    assert all(v["failures"] == 0 for v in stats.values()), stats
    assert all(len(r.rcpt_tos) == 3 and b"with LMTP" in r.trace for r in records)


def test_refused_recipients_and_messages_show_with_their_codes(tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    out = tmp_path / "run"
    faults = ["RCPT:550:every=4", "EOD:452:every=5"]
    # max_errors=0: the sink's limit on errors per session would otherwise end a session
    # with 421 after its 20th refusal (DATA's 503 after a refused RCPT counts as one).
    with SinkThread(store=f"maildir:{maildir}", faults=faults, max_errors=0) as sink:
        done = run_headless(sink, out, "-u", "2", "-r", "2")
    # Failures make Locust's exit status 1 (its --exit-code-on-error).
    assert done.returncode == 1, done.stderr[-3000:]
    stats = read_stats(out)
    failures = read_failures(out)
    assert successes(stats) == stored(maildir) > 0
    # The error is the reply (SMTPReplyError('452 4.3.1 Requested action ...')): by code.
    codes = re.compile(r"\w+\('((?:RCPT )?\d{3} \d\.\d+\.\d+) ")
    by_code = {(name, codes.match(error)[1]): n for (name, error), n in failures.items()}  # type: ignore[index]
    assert by_code == {
        ("MAIL+RCPT+DATA", "RCPT 550 5.1.1"): stats["MAIL+RCPT+DATA"]["failures"],
        ("end of data", "452 4.3.1"): stats["end of data"]["failures"],
    }
    assert min(by_code.values()) > 0


def test_starttls_and_auth(tmp_path: Path, tls_files: Any, auth_file: Path) -> None:
    maildir = tmp_path / "mail"
    out = tmp_path / "run"
    with SinkThread(
        store=f"maildir:{maildir}",
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
        auth_file=str(auth_file),
        auth_required=True,
    ) as sink:
        done = run_headless(
            sink,
            out,
            "-u", "2", "-r", "2",
            "--starttls",
            "--auth-user", "alice",
            "--auth-password", "wonderland",
            "--auth-mech", "LOGIN",
            "--pipelining", "off",
            "--per-connection", "5",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        records = sink.messages
    stats = read_stats(out)
    assert successes(stats) == stored(maildir) > 0
    connections = stats["connect"]["requests"]
    for name in ("banner", "STARTTLS", "TLS", "AUTH", "QUIT"):
        assert stats[name] == {"requests": connections, "failures": 0}, name
    assert stats["EHLO"] == {"requests": 2 * connections, "failures": 0}  # before and after TLS
    assert all(r.tls and r.auth_user == "alice" for r in records)


def test_refused_connection_is_a_connect_failure(tmp_path: Path) -> None:
    out = tmp_path / "run"
    port = free_port()
    done = subprocess.run(
        locust_command(
            "--headless", "--host", f"smtp://127.0.0.1:{port}", "-u", "1", "-r", "1",
            "--run-time", "1s", "--csv", str(out), "--only-summary",
        ),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    stats = read_stats(out)
    assert stats.keys() == {"connect"}
    assert stats["connect"]["failures"] == stats["connect"]["requests"] > 0
    assert all("refused" in error for (_, error) in read_failures(out))
    # The user backs off (0.1 s, then up to 0.2, 0.4 ... s) instead of reconnecting at once,
    # thousands of times a second: within the 1 s run, at most 1 + 10 attempts fit.
    assert stats["connect"]["requests"] <= 11


def test_master_with_two_workers_counts_what_the_sink_stored(tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    out = tmp_path / "run"
    master_port = free_port()
    with SinkThread(store=f"maildir:{maildir}") as sink:
        workers = [
            subprocess.Popen(
                locust_command("--worker", "--master-host", "127.0.0.1",
                               "--master-port", str(master_port)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]  # fmt: skip
        try:
            master = subprocess.run(
                locust_command(
                    "--master", "--master-bind-host", "127.0.0.1",
                    "--master-bind-port", str(master_port),
                    "--expect-workers", "2", "--expect-workers-max-wait", "30",
                    "--headless", "--host", f"smtp://{sink.host}:{sink.port}",
                    "-u", "4", "-r", "4", "--run-time", "3s",
                    "--csv", str(out), "--only-summary",
                    "--rcpts", "3",  # the master's options reach the workers
                ),
                capture_output=True,
                text=True,
                timeout=PROCESS_TIMEOUT,
            )  # fmt: skip
            worker_status = [w.wait(timeout=PROCESS_TIMEOUT) for w in workers]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
        records = sink.messages
    assert master.returncode == 0, master.stderr[-3000:]
    assert worker_status == [0, 0]
    stats = read_stats(out)
    assert successes(stats) == stored(maildir) > 0
    assert all(v["failures"] == 0 for v in stats.values()), stats
    assert stats["connect"]["requests"] == stats["QUIT"]["requests"] == 4
    assert all(len(r.rcpt_tos) == 3 for r in records)
    # Both workers sent mail: a Message-ID names the process that made it (<n.RUN@...>).
    runs = {r.message["Message-ID"].split(".", 1)[1] for r in records}
    assert len(runs) == 2


SMTP_SINK = Path("/usr/sbin/smtp-sink")


def test_postfix_smtp_sink_counts_what_locust_counted(tmp_path: Path) -> None:
    """Against a server that is not ours: Postfix's smtp-sink and its message counter."""
    if not SMTP_SINK.exists():
        pytest.skip(f"Postfix smtp-sink not installed ({SMTP_SINK}; Debian package postfix)")
    port = free_port()
    log = tmp_path / "smtp-sink.log"
    out = tmp_path / "run"
    with log.open("wb") as counters:
        # -u nobody: it refuses to run as root otherwise; -c: running counters on stdout,
        # updated as sessions end.
        server = subprocess.Popen(
            [str(SMTP_SINK), "-u", "nobody", "-c", f"127.0.0.1:{port}", "128"],
            stdout=counters,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, log.read_text()
                time.sleep(0.05)
        done = subprocess.run(
            locust_command(
                "--headless", "--host", f"smtp://127.0.0.1:{port}", "-u", "3", "-r", "3",
                "--run-time", "3s", "--csv", str(out), "--only-summary",
                "--per-connection", "50",
            ),
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        stats = read_stats(out)
        expected = successes(stats)
        # Every session ended with QUIT before Locust exited; the counter follows at once.
        deadline = time.monotonic() + 10
        while True:
            found = re.findall(r"mesg=(\d+)", log.read_text(errors="replace"))
            counted = int(found[-1]) if found else 0
            if counted >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert counted == expected > 0
    assert stats["connect"]["requests"] == stats["QUIT"]["requests"]


def test_implicit_tls_and_eml_replay(tmp_path: Path, tls_files: Any) -> None:
    maildir = tmp_path / "mail"
    out = tmp_path / "run"
    eml = tmp_path / "hello.eml"
    eml.write_bytes(b"From: a@x.test\r\nSubject: replayed\r\n\r\nthe same every time\r\n")
    with SinkThread(
        store=f"maildir:{maildir}",
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
        tls_listen=["127.0.0.1:0"],
    ) as sink:
        host, port = sink.tls_address
        done = subprocess.run(
            locust_command(
                "--headless", "--host", f"smtps://{host}:{port}", "-u", "2", "-r", "2",
                "--run-time", "2s", "--csv", str(out), "--only-summary", "--eml", str(eml),
            ),
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        records = sink.messages
    stats = read_stats(out)
    assert successes(stats) == stored(maildir) > 0
    assert stats["TLS"]["requests"] == stats["connect"]["requests"] == 2
    assert "STARTTLS" not in stats
    assert all(r.tls and r.raw == eml.read_bytes() for r in records)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--host", "127.0.0.1"], "bad target '127.0.0.1': no port"),
        (["--size", "1k,2k"], "bad size mix '1k,2k': missing weight"),
        (["--rcpt-to", "{x}@y.test"], "unknown field {x}"),
        (["--backoff", "5:1"], "bad --backoff '5:1'"),
        (["--per-connection", "-1"], "--per-connection -1: must be 0 or more"),
        (["--smtp-timeout", "0"], "--smtp-timeout 0: must be"),
    ],
)
def test_a_bad_option_is_one_line_and_status_2(option: list[str], message: str) -> None:
    done = subprocess.run(
        locust_command("--headless", "--host", "smtp://127.0.0.1:1", "-u", "1", *option),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("locust: ")
    assert message in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr
