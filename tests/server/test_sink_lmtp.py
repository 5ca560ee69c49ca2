"""The sink in LMTP mode (``--lmtp``) over real sockets, with real LMTP clients: Python's
``smtplib.LMTP`` and ``mailstorm load --lmtp``.

``smtplib.LMTP`` speaks LHLO but its ``data()`` reads only the first reply after the end of
data (CPython's LMTP class does not know RFC 2033's reply per recipient); ``lmtp_send`` reads
the others with ``getreply()``, as an LMTP client must.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_TIMEOUT

from mailstorm.sink import SinkThread
from mailstorm.sink.cli import _worker_args, build_parser, config_from_args

MESSAGE = b"From: s@example.com\r\nSubject: lmtp test\r\n\r\nHello.\r\n"
FULL = r"EOD to=~@full\.test:452 4.2.2 mailbox full"


def lmtp_send(
    client: smtplib.LMTP, sender: str, rcpts: list[str], message: bytes = MESSAGE
) -> dict[str, tuple[int, str]]:
    """One transaction: the end-of-data reply of each recipient accepted at RCPT."""
    assert client.mail(sender)[0] == 250
    accepted = [rcpt for rcpt in rcpts if client.rcpt(rcpt)[0] == 250]
    code, text = client.data(message)
    replies = [(code, text.decode())]
    for _ in accepted[1:]:
        code, text = client.getreply()
        replies.append((code, text.decode()))
    return dict(zip(accepted, replies, strict=True))


def test_smtplib_lmtp_gets_a_reply_per_recipient_and_a_fault_for_one(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    with SinkThread(lmtp=True, store=f"maildir:{mail}", faults=[FULL]) as sink, smtplib.LMTP(
        sink.host, sink.port, timeout=TEST_TIMEOUT
    ) as client:
        assert client.helo("client.test")[0] == 500  # RFC 2033: LHLO only
        assert client.ehlo("client.test")[0] == 250  # smtplib.LMTP sends LHLO
        assert client.does_esmtp
        assert client.has_extn("pipelining") and client.has_extn("enhancedstatuscodes")
        replies = lmtp_send(client, "s@example.com", ["a@x.test", "b@full.test", "c@x.test"])
        assert replies["a@x.test"][0] == 250
        assert "<a@x.test> OK: queued as" in replies["a@x.test"][1]
        assert replies["b@full.test"] == (452, "4.2.2 <b@full.test> mailbox full")
        assert replies["c@x.test"][0] == 250
        # The session is in step: a second transaction, then NOOP, get their own replies.
        second = lmtp_send(client, "s@example.com", ["d@full.test"])
        assert second["d@full.test"][0] == 452
        assert client.noop()[0] == 250
        (record,) = sink.wait_for(1, timeout=TEST_TIMEOUT)
        stats = sink.stats
    # Stored once, for the recipients answered 250; the trace says LMTP.
    assert record.rcpt_tos == ["a@x.test", "c@x.test"]
    assert b"with LMTP" in record.trace
    assert len(list((mail / "new").iterdir())) == 1
    assert (stats.messages, stats.messages_refused) == (1, 1)
    assert (stats.lmtp_recipients_delivered, stats.lmtp_recipients_refused) == (2, 2)
    assert stats.fault_counts == {"EOD 452": 2}


def test_a_storage_failure_is_a_451_for_each_recipient(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    with SinkThread(lmtp=True, store=f"maildir:{mail}") as sink, smtplib.LMTP(
        sink.host, sink.port, timeout=TEST_TIMEOUT
    ) as client:
        client.ehlo("client.test")
        # Break the store under the running sink: new/ becomes a regular file.
        shutil.rmtree(mail / "new")
        (mail / "new").write_bytes(b"")
        replies = lmtp_send(client, "s@example.com", ["a@x.test", "b@x.test"])
        assert [code for code, _ in replies.values()] == [451, 451]
        assert replies["b@x.test"][1].startswith("4.3.0 <b@x.test> Error: local error")
        assert client.noop()[0] == 250
        stats = sink.stats
    assert (stats.storage_failures, stats.lmtp_recipients_refused) == (1, 2)


def test_a_thousand_recipients_each_get_their_reply() -> None:
    rcpts = [f"user{i}@x.test" for i in range(1000)]
    with SinkThread(lmtp=True, faults=["EOD:452:every=100"]) as sink, smtplib.LMTP(
        sink.host, sink.port, timeout=TEST_TIMEOUT
    ) as client:
        client.ehlo("client.test")
        replies = lmtp_send(client, "s@example.com", rcpts)
        assert client.noop()[0] == 250
        stats = sink.stats
    refused = [rcpt for rcpt, (code, _) in replies.items() if code != 250]
    assert refused == [f"user{i}@x.test" for i in range(99, 1000, 100)]
    assert all(f"<{rcpt}>" in text for rcpt, (_, text) in replies.items())
    assert (stats.messages, stats.recipients) == (1, 990)
    assert (stats.lmtp_recipients_delivered, stats.lmtp_recipients_refused) == (990, 10)


def test_mailstorm_load_lmtp_stores_exactly_what_it_counts(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    report = tmp_path / "report.json"
    with SinkThread(lmtp=True, store=f"maildir:{mail}") as sink:
        result = subprocess.run(
            [sys.executable, "-m", "mailstorm.load", f"lmtp://127.0.0.1:{sink.port}",
             "--sessions", "4", "--messages", "60", "--rcpts", "3", "--quiet",
             "--json", str(report)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        stats = sink.stats
    assert result.returncode == 0, result.stderr
    totals = json.loads(report.read_text())["totals"]
    assert totals["delivered"] == 60 and totals["errors"] == 0
    assert len(list((mail / "new").iterdir())) == totals["delivered"]
    assert stats.lmtp_recipients_delivered == 3 * 60


def test_the_option_reaches_the_config_and_the_workers() -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args(["--lmtp"])).lmtp is True
    assert config_from_args(parser.parse_args([])).lmtp is False
    assert "--lmtp" in _worker_args(["--lmtp", "--workers", "2"], [], [])
    assert "speak LMTP" in parser.format_help()


@pytest.mark.parametrize("argv", [["--lmtp=yes"], ["--lmtp", "x"]])
def test_a_bad_lmtp_option_is_one_line_and_status_2(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailstorm.sink", *argv],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_client_that_never_reads_its_replies_is_timed_out(tmp_path: Path) -> None:
    """After a store, a thousand replies are more than the socket buffers hold: a client that
    does not read them is ended by the command timeout, not waited for forever."""
    rcpts = "".join(f"RCPT TO:<user{i}@x.test>\r\n" for i in range(1000))
    with SinkThread(
        lmtp=True, store=f"maildir:{tmp_path / 'mail'}", command_timeout=1.0
    ) as sink, socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
        client.settimeout(TEST_TIMEOUT)
        client.connect(sink.address)
        client.sendall(f"LHLO c.test\r\nMAIL FROM:<s@example.com>\r\n{rcpts}DATA\r\n".encode())
        received = b""
        while b"\r\n354 " not in received:
            received += client.recv(65536)
        client.sendall(b"Subject: x\r\n\r\nx\r\n.\r\n")  # then never read again
        sink.wait_for(1, timeout=TEST_TIMEOUT)
        deadline = time.monotonic() + TEST_TIMEOUT
        while sink.stats.sessions_active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.stats.sessions_active == 0


@pytest.mark.smtp_sink(lmtp=True)
def test_the_pytest_fixture_speaks_lmtp(smtp_sink: SinkThread) -> None:
    with smtplib.LMTP(smtp_sink.host, smtp_sink.port, timeout=TEST_TIMEOUT) as client:
        client.ehlo("client.test")
        replies = lmtp_send(client, "s@example.com", ["a@x.test", "b@x.test"])
    assert [code for code, _ in replies.values()] == [250, 250]
    (record,) = smtp_sink.wait_for(1, timeout=TEST_TIMEOUT)
    assert record.rcpt_tos == ["a@x.test", "b@x.test"]


def test_the_workers_speak_lmtp_and_say_so(tmp_path: Path) -> None:
    """--lmtp passes through the supervisor to every worker; the start-up line says LMTP."""
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        sink = subprocess.Popen(
            [sys.executable, "-m", "mailstorm.sink", "--lmtp", "--workers", "2",
             "--listen", "127.0.0.1:0"],
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + TEST_TIMEOUT
        while (m := re.search(r"sink \(LMTP\) listening on 127\.0\.0\.1:(\d+)",
                              log.read_text())) is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        for _ in range(4):  # connections land on either worker
            with smtplib.LMTP("127.0.0.1", int(m.group(1)), timeout=TEST_TIMEOUT) as client:
                assert client.helo("client.test")[0] == 500
                assert client.ehlo("client.test")[0] == 250
                replies = lmtp_send(client, "s@example.com", ["a@x.test", "b@x.test"])
                assert [code for code, _ in replies.values()] == [250, 250]
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(TEST_TIMEOUT)
    assert sink.returncode == 0
