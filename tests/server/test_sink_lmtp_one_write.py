"""LMTP with adversarial timing: a whole transaction in one write, over a real socket.

The per-recipient replies after the end of data are queued one per step under the bound on
unsent output, whichever driver runs the session: the task, or the readiness hub's inline
handler (``tests/run.sh`` runs this file with the hub on and off). A store that answers at
once (``discard``) is carried out inline; one that waits (``maildir:``) in the task.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import TEST_TIMEOUT

from mailstorm.sink import SinkThread, read_maildir

RECIPIENTS = 300  # their replies (about 40 octets each) are several times the output bound


def one_write(rcpts: list[str]) -> bytes:
    commands = "".join(f"RCPT TO:<{rcpt}>\r\n" for rcpt in rcpts)
    body = "Subject: one write\r\n\r\n" + "line of content\r\n" * 2000
    return (
        f"LHLO client.test\r\nMAIL FROM:<s@example.com>\r\n{commands}DATA\r\n{body}.\r\nQUIT\r\n"
    ).encode()


def until_closed(sock: socket.socket) -> bytes:
    received = b""
    while data := sock.recv(65536):
        received += data
    return received


@pytest.mark.parametrize("store", ["discard", "maildir"])
def test_a_whole_transaction_in_one_write_gets_every_reply_in_order(
    tmp_path: Path, store: str
) -> None:
    rcpts = [f"user{i}@x.test" for i in range(RECIPIENTS)]
    spec = "discard" if store == "discard" else f"maildir:{tmp_path / 'mail'}"
    with SinkThread(lmtp=True, store=spec) as sink, socket.create_connection(
        sink.address, timeout=TEST_TIMEOUT
    ) as client:
        client.sendall(one_write(rcpts))
        lines = until_closed(client).decode().split("\r\n")
        stats = sink.stats
    codes = [line[:4] for line in lines if line[:3].isdigit() and line[3:4] == " "]
    # Banner, LHLO's last line, MAIL, a 250 per RCPT, 354, a 250 per recipient, 221.
    assert codes == ["220 ", "250 ", "250 ", *["250 "] * RECIPIENTS, "354 ",
                     *["250 "] * RECIPIENTS, "221 "]  # fmt: skip
    answered = [line for line in lines if line.startswith("250 2.0.0 <")]
    assert [line.split("<", 1)[1].split(">", 1)[0] for line in answered] == rcpts
    assert (stats.messages, stats.lmtp_recipients_delivered) == (1, RECIPIENTS)
    if store == "maildir":
        # One file (a Received header names its recipient only when there is one).
        assert len(read_maildir(tmp_path / "mail")) == 1
