"""``read_maildir``: records of a Maildir that a sink wrote, from its trace headers, whether an
embedded sink or ``mailstorm sink --workers N`` wrote it."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import TEST_TIMEOUT, TLSFiles, wait_for_output

from mailstorm.sink import open_sink, read_maildir

RAW = b"Subject: =?ISO-8859-1?Q?caf=E9?=\r\nReceived: from elsewhere\r\n\r\nbody\r\n"


async def test_records_read_back_match_what_the_sink_recorded(
    tmp_path: Path, tls_files: TLSFiles, auth_file: Path
) -> None:
    maildir = tmp_path / "mail"
    async with open_sink(
        store=f"maildir:{maildir}",
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
        auth_file=str(auth_file),
    ) as sink:

        def send_three() -> None:
            with smtplib.SMTP(*sink.address, timeout=TEST_TIMEOUT) as client:
                client.sendmail("one@example.test", ["r@example.test"], RAW)
                client.sendmail("two@example.test", ["r1@example.test", "r2@example.test"], RAW)
            with smtplib.SMTP(
                *sink.address, timeout=TEST_TIMEOUT, source_address=("127.0.0.2", 0)
            ) as client:
                client.starttls(context=tls_files.client_context())
                client.login("bob", "pa:ss word")
                client.sendmail("", ["r@example.test"], RAW)

        await trio.to_thread.run_sync(send_three)
        live = await sink.wait_for(3, timeout=TEST_TIMEOUT)

    read = read_maildir(maildir)
    assert [r.path for r in read] == [r.path for r in live]
    for before, after in zip(live, read, strict=True):
        assert after.mail_from == before.mail_from
        assert after.client_address == before.client_address
        assert after.tls == before.tls and after.auth_user == before.auth_user
        assert after.envelope.helo == before.envelope.helo
        assert after.trace == before.trace
        assert after.raw == before.raw == RAW  # the content's own Received header stays in it
        assert after.message["Subject"] == "café"
        # The Received date: whole seconds, taken just before the message was stored.
        assert after.received_at == int(after.received_at) <= before.received_at
    # The Received header names a recipient only when there was one (RFC 5321 7.6).
    assert [r.rcpt_tos for r in read] == [["r@example.test"], [], ["r@example.test"]]
    assert [(r.client_address, r.tls, r.auth_user) for r in read] == [
        ("127.0.0.1", False, None),
        ("127.0.0.1", False, None),
        ("127.0.0.2", True, "bob"),
    ]


def test_files_without_the_sinks_trace_are_skipped(tmp_path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "new" / "1.M1P1Q1.host").write_bytes(b"Subject: not from the sink\r\n\r\nx\r\n")
    (tmp_path / "cur" / "2.M1P1Q1.host:2,S").write_bytes(
        b"Return-Path: <a@x.test>\r\nSubject: no Received header\r\n\r\nx\r\n"
    )
    assert read_maildir(tmp_path) == []




@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_records_of_a_sink_with_workers(tmp_path: Path) -> None:
    """The embedding API is one process; with ``--workers`` the Maildir is where the records
    of every worker meet."""
    log = tmp_path / "stderr.txt"
    maildir = tmp_path / "mail"
    with log.open("w") as stderr:
        sink = subprocess.Popen(
            [sys.executable, "-m", "mailstorm.sink", "--workers", "2", "--listen",
             "127.0.0.1:0", "--store", f"maildir:{maildir}"],
            stderr=stderr, start_new_session=True,
        )
    try:
        port = int(wait_for_output(log, r"listening on 127\.0\.0\.1:(\d+)").group(1))
        for n in range(20):
            with smtplib.SMTP("127.0.0.1", port, timeout=TEST_TIMEOUT) as client:
                client.sendmail(f"s{n}@example.test", ["r@example.test"], RAW)
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(timeout=TEST_TIMEOUT) == 0
    finally:
        if sink.poll() is None:
            os.killpg(sink.pid, signal.SIGKILL)
            sink.wait()
    records = read_maildir(maildir)
    # Sent one after another, so in order whichever worker took each.
    assert [r.mail_from for r in records] == [f"s{n}@example.test" for n in range(20)]
    assert all(r.raw == RAW and r.client_address == "127.0.0.1" for r in records)
