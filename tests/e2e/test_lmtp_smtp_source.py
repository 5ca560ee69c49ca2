"""Postfix's ``smtp-source -L`` (an LMTP client) against ``mailstorm sink --lmtp``.

smtp-source sends ``-r N`` recipients per message, named ``to@``, ``2to@``, ... ``Nto@`` (a
number put before the address given with ``-t``; RCPT order N down to 1), reads one reply per
recipient after the end of data, and stops with "fatal: end of data rejected" at the first
that is not 2xx. Skipped, with the reason, when smtp-source is not installed (Debian package
``postfix``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_TIMEOUT

from mailstorm.sink import SinkThread

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        (shutil.which("smtp-source") or shutil.which("/usr/sbin/smtp-source")) is None,
        reason="smtp-source is not installed (Debian package 'postfix')",
    ),
]

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
#: Bound on one smtp-source run.
PROCESS_TIMEOUT = 60.0
RECIPIENTS = ["3to@example.com", "2to@example.com", "to@example.com"]


def smtp_source(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SMTP_SOURCE, "-L", *options, "-f", "from@example.com", "-t", "to@example.com",
         f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False,
    )


def wait_for(path: Path, pattern: str) -> re.Match[str]:
    deadline = time.monotonic() + TEST_TIMEOUT
    while (m := re.search(pattern, path.read_text())) is None:
        assert time.monotonic() < deadline, f"no {pattern!r} in:\n{path.read_text()}"
        time.sleep(0.05)
    return m


def test_smtp_source_lmtp_against_the_sink_command(tmp_path: Path) -> None:
    """The command line as a user runs it: 50 messages of 3 recipients over 5 sessions, each
    stored once (Maildir), all 150 recipients answered 250."""
    mail = tmp_path / "mail"
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        sink = subprocess.Popen(
            [sys.executable, "-m", "mailstorm.sink", "--lmtp", "--listen", "127.0.0.1:0",
             "--store", f"maildir:{mail}"],
            stderr=stderr,
        )
    try:
        port = int(wait_for(log, r"listening on 127\.0\.0\.1:(\d+)").group(1))
        result = smtp_source(port, "-s", "5", "-m", "50", "-r", "3", "-c")
        assert result.returncode == 0, result.stderr
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(TEST_TIMEOUT)
    assert sink.returncode == 0
    stopped = wait_for(log, r"stopped: .*")[0]
    assert "messages 50," in stopped
    assert "LMTP recipients 150 delivered / 0 refused" in stopped
    files = sorted((mail / "new").iterdir())
    assert len(files) == 50 and list((mail / "tmp").iterdir()) == []
    for path in files:
        raw = path.read_bytes()
        assert raw.startswith(b"Return-Path: <from@example.com>\r\nReceived: from ")
        assert b" with LMTP\r\n" in raw
        # Three recipients: the Received header names none of them (RFC 5321 7.6).
        assert b"for <" not in raw


def test_smtp_source_lmtp_envelopes_and_reused_sessions() -> None:
    """With -d each session carries many transactions: every message is stored once with its
    three recipients, in RCPT order."""
    with SinkThread(lmtp=True) as sink:
        result = smtp_source(sink.port, "-d", "-s", "5", "-m", "50", "-r", "3")
        assert result.returncode == 0, result.stderr
        records = sink.wait_for(50, timeout=TEST_TIMEOUT)
        stats = sink.stats
    assert all(record.rcpt_tos == RECIPIENTS for record in records)
    assert all(record.envelope.greeting == "LMTP" for record in records)
    assert (stats.messages, stats.sessions_total) == (50, 5)
    assert (stats.lmtp_recipients_delivered, stats.lmtp_recipients_refused) == (150, 0)


def test_smtp_source_sees_a_fault_for_one_recipient() -> None:
    """An EOD fault naming one recipient: smtp-source reads the replies per recipient and
    stops at that one's 452; the message is stored for the two others."""
    with SinkThread(lmtp=True, faults=[r"EOD to=2to@*:452 4.2.2 mailbox full"]) as sink:
        result = smtp_source(sink.port, "-m", "1", "-r", "3")
        (record,) = sink.wait_for(1, timeout=TEST_TIMEOUT)
        stats = sink.stats
    assert result.returncode != 0
    assert "end of data rejected: 452 4.2.2 <2to@example.com> mailbox full" in result.stderr
    assert record.rcpt_tos == ["3to@example.com", "to@example.com"]
    assert (stats.lmtp_recipients_delivered, stats.lmtp_recipients_refused) == (2, 1)
