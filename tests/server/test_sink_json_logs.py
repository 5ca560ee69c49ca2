"""``mailstorm sink --log-format json --log-events``, run as a process: every line of stderr is
one JSON object, the events carry their fields, a stored message's Received header leads to
its session's lines, and no password, AUTH exchange or message content is ever in the log."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import TLSFiles

from mailstorm.ports import free_port
from mailstorm.sink import read_maildir

PROCESS_TIMEOUT = 30.0
PASSWORD = "pw-Zq83-only-in-the-auth-file"
WRONG_PASSWORD = "wrong-Kx71-never-logged"
MARKER = "BODY-MARKER-5f3a9c"


def _events(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, each of which must be one JSON object."""
    entries = []
    for line in path.read_text(encoding="ascii").splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def _wait_for_event(path: Path, event: str) -> dict[str, Any]:
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while True:
        # A line being written may be incomplete: only complete lines are parsed.
        text = path.read_text()
        complete = text[: text.rfind("\n") + 1]
        for line in complete.splitlines():
            entry = json.loads(line)
            if entry["event"] == event:
                return dict(entry)
        assert time.monotonic() < deadline, f"no {event!r} event in:\n{text}"
        time.sleep(0.05)


@contextmanager
def _sink(tmp_path: Path, *options: str) -> Iterator[tuple[int, Path]]:
    """A sink process on a free loopback port, its stderr in a file; stopped with SIGTERM."""
    port = free_port()
    log = tmp_path / "stderr.jsonl"
    with log.open("w") as stderr:
        sink = subprocess.Popen(
            [sys.executable, "-m", "mailstorm", "sink", "--listen", f"127.0.0.1:{port}",
             "--log-format", "json", *options],
            stderr=stderr, stdout=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        _wait_for_event(log, "listening")
        yield port, log
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(timeout=PROCESS_TIMEOUT) == 0, log.read_text()
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


def _message(index: int = 0) -> str:
    return (
        f"From: a@example.test\r\nTo: b@example.test\r\nSubject: logs {index}\r\n"
        f"Message-ID: <m{index}.logs@example.test>\r\n\r\n{MARKER} {index}\r\n"
    )


def test_json_events_lead_from_a_stored_message_to_its_session(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text(f"alice:{PASSWORD}\n")
    maildir = tmp_path / "mail"
    with _sink(tmp_path, "--log-events", "--store", f"maildir:{maildir}",
               "--auth-file", str(users), "--max-auth-failures", "0") as (port, log):
        with smtplib.SMTP("127.0.0.1", port, timeout=PROCESS_TIMEOUT) as client:
            client.login("alice", PASSWORD)  # AUTH PLAIN
            client.sendmail("a@example.test", ["b@example.test", "c@example.test"], _message())
        with smtplib.SMTP("127.0.0.1", port, timeout=PROCESS_TIMEOUT) as client:
            client.ehlo()
            for mechanism in ("LOGIN", "PLAIN"):
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    client.user, client.password = "alice", WRONG_PASSWORD
                    client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
        _wait_for_event(log, "session_end")
    entries = _events(log)
    by_event: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        assert {"time", "level", "logger", "event", "message"} <= entry.keys()
        by_event.setdefault(entry["event"], []).append(entry)
    assert {"listening", "session_start", "auth_ok", "message_accepted", "auth_failed",
            "session_end", "shutdown", "stopped"} <= by_event.keys()

    (record,) = read_maildir(maildir)
    assert record.session_id is not None and record.queue_id is not None
    (accepted,) = by_event["message_accepted"]
    assert accepted["queue_id"] == record.queue_id
    assert accepted["session"] == record.session_id
    assert accepted["code"] == 250
    assert accepted["from"] == "a@example.test"
    assert accepted["recipients"] == 2
    assert accepted["size"] == len(record.raw)
    assert accepted["message_id"] == "<m0.logs@example.test>"
    assert accepted["client"].startswith("127.0.0.1:")
    session_lines = [e["event"] for e in entries if e.get("session") == record.session_id]
    assert session_lines == ["session_start", "auth_ok", "message_accepted", "session_end"]
    (first_end, second_end) = by_event["session_end"]
    assert first_end["session"] == record.session_id
    assert first_end["reason"] == "quit"
    assert first_end["messages"] == 1
    assert isinstance(first_end["duration"], float)
    assert second_end["messages"] == 0
    assert [e["mechanism"] for e in by_event["auth_failed"]] == ["LOGIN", "PLAIN"]
    assert all(e["user"] == "alice" for e in by_event["auth_failed"])
    assert by_event["auth_ok"][0]["user"] == "alice"

    # What must never be logged: passwords (as typed, and as the AUTH exchange carries them)
    # and the message's content.
    text = log.read_text()
    for secret in (PASSWORD, WRONG_PASSWORD):
        assert secret not in text
        for form in (secret, f"\0alice\0{secret}"):
            assert base64.b64encode(form.encode()).decode() not in text
    assert MARKER not in text

    if shutil.which("jq"):
        result = subprocess.run(
            ["jq", "-c", 'select(.event=="message_accepted")'],
            stdin=log.open("rb"), capture_output=True, check=True, timeout=PROCESS_TIMEOUT,
        )
        (line,) = result.stdout.decode().splitlines()
        assert json.loads(line)["queue_id"] == record.queue_id


def test_without_log_events_nothing_is_logged_per_message(tmp_path: Path) -> None:
    with _sink(tmp_path, "--fault", "RCPT to=x@*:550") as (port, log):
        with smtplib.SMTP("127.0.0.1", port, timeout=PROCESS_TIMEOUT) as client:
            for index in range(3):
                client.sendmail("a@example.test", ["b@example.test"], _message(index))
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("a@example.test", ["x@example.test"], _message(9))
        _wait_for_event(log, "fault")
    entries = _events(log)
    events = [e["event"] for e in entries]
    assert events == ["listening", "fault", "shutdown", "stopped"], entries
    (fault,) = (e for e in entries if e["event"] == "fault")
    assert fault["point"] == "RCPT" and fault["fault"] == "550"
    assert fault["client_ip"] == "127.0.0.1" and fault["rule"] == "fault 'RCPT to=x@*:550'"
    assert len(fault["session"]) == 12
    assert entries[-1]["counters"]["messages"] == 3


@pytest.mark.skipif(not hasattr(__import__("socket"), "SO_REUSEPORT"), reason="SO_REUSEPORT")
def test_workers_write_json_lines_too(tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    with _sink(tmp_path, "--workers", "2", "--log-events",
               "--store", f"maildir:{maildir}") as (port, log):
        for index in range(6):
            with smtplib.SMTP("127.0.0.1", port, timeout=PROCESS_TIMEOUT) as client:
                client.sendmail("a@example.test", ["b@example.test"], _message(index))
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while sum(e["event"] == "session_end" for e in _events(log)) < 6:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    entries = _events(log)
    (listening,) = (e for e in entries if e["event"] == "listening")
    assert listening["workers"] == 2 and len(listening["pids"]) == 2
    accepted = {e["queue_id"] for e in entries if e["event"] == "message_accepted"}
    assert accepted == {record.queue_id for record in read_maildir(maildir)}
    assert len(accepted) == 6
    (stopped,) = (e for e in entries if e["event"] == "stopped")
    assert stopped["counters"]["messages"] == 6


def test_a_record_knows_its_queue_and_session_ids(caplog: pytest.LogCaptureFixture) -> None:
    from mailstorm.sink import SinkThread

    caplog.set_level(logging.INFO, logger="mailstorm.sink.events")
    with SinkThread(log_events=True) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=PROCESS_TIMEOUT) as client:
            client.ehlo()
            client.sendmail("a@example.test", ["b@example.test"], _message())
        (record,) = sink.wait_for(1, timeout=PROCESS_TIMEOUT)
    assert record.queue_id is not None and re.fullmatch(r"[0-9A-Z]{12}-1", record.queue_id)
    assert record.session_id == record.queue_id[:12]
    accepted = [r for r in caplog.records if getattr(r, "event", None) == "message_accepted"]
    assert [r.queue_id for r in accepted] == [record.queue_id]
    events = [r for r in caplog.records if r.name == "mailstorm.sink.events"]
    assert len(events) == 3 and {r.session for r in events} == {record.session_id}


def test_starttls_and_refusals_are_events(
    caplog: pytest.LogCaptureFixture, tls_files: TLSFiles
) -> None:
    from mailstorm.sink import SinkThread

    caplog.set_level(logging.INFO, logger="mailstorm.sink.events")
    with SinkThread(
        log_events=True, tls_cert=str(tls_files.cert), tls_key=str(tls_files.key), max_size=1000
    ) as sink, smtplib.SMTP(sink.host, sink.port, timeout=PROCESS_TIMEOUT) as client:
        client.starttls(context=tls_files.client_context())
        client.ehlo()
        client.mail("a@example.test")  # no SIZE=: the refusal comes at the end of data
        client.rcpt("b@example.test")
        assert client.data("x" * 2000)[0] == 552
    fields = [r.__dict__ for r in caplog.records if r.name == "mailstorm.sink.events"]
    assert [f["event"] for f in fields] == [
        "session_start", "tls_started", "message_refused", "session_end"
    ]
    assert fields[1]["tls_version"].startswith("TLSv1.")
    assert fields[1]["cipher"]
    assert fields[2]["code"] == 552 and fields[2]["reason"] == "too big"
    assert fields[2]["from"] == "a@example.test" and fields[2]["recipients"] == 1
    assert fields[3]["reason"] == "quit"


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--log-level", "debug", "-q"], "--log-level cannot be combined with -v or -q"),
        (["--log-format", "yaml"], "--log-format"),
        (["--log-level", "chatty"], "--log-level"),
    ],
)
def test_bad_logging_options_are_one_line_and_status_2(argv: list[str], complaint: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailstorm", "sink", *argv],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and complaint in result.stderr, result.stderr


def test_help_explains_the_logging_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailstorm", "sink", "--help"],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=True,
    )
    text = " ".join(result.stdout.split())
    for needle in ("--log-format {text,json}", "--log-level {debug,info,warning,error}",
                   "--log-events", "whatever --log-level says"):
        assert needle in text
