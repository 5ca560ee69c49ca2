"""A 250 survives a crash: SIGKILL a sink process in the middle of a stream of deliveries, and
every message it acknowledged is in the Maildir, whole, readable by ``mailbox``.

A killed process loses nothing that reached the kernel, so this checks the order (the 250
leaves only once the message is in ``new/``), with the process killed at a point nobody chose;
the fsyncs that make the same true across a power loss are checked in ``tests/test_stores.py``.
"""

from __future__ import annotations

import mailbox
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio
from conftest import TEST_TIMEOUT, SMTPClient

from mailstorm.ports import free_port

CLIENTS = 4
BODY = "Subject: crash test\r\n\r\n" + "line of text\r\n" * 200


async def deliver_until_killed(port: int, acknowledged: list[str]) -> None:
    """Send messages one after another; record each queue id the sink answers 250 with."""
    try:
        client = await SMTPClient.connect(("127.0.0.1", port))
        assert (await client.reply()).code == 220
        assert (await client.cmd("EHLO crash.test")).code == 250
        while True:
            assert (await client.cmd("MAIL FROM:<a@crash.test>")).code == 250
            assert (await client.cmd("RCPT TO:<b@sink.test>")).code == 250
            assert (await client.cmd("DATA")).code == 354
            reply = await client.cmd(BODY + ".")
            assert reply.code == 250, reply
            match = re.search(r"queued as (\S+)", reply.lines[-1])
            assert match is not None
            acknowledged.append(match.group(1))
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return  # the sink is gone


async def test_every_acknowledged_message_survives_sigkill(tmp_path: Path) -> None:
    port = free_port()
    maildir = tmp_path / "mail"
    sink = subprocess.Popen(
        [sys.executable, "-m", "mailstorm.sink", "--listen", f"127.0.0.1:{port}",
         "--store", f"maildir:{maildir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    acknowledged: list[str] = []
    try:
        assert sink.stderr is not None
        assert "listening" in sink.stderr.readline().decode()
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for _ in range(CLIENTS):
                    nursery.start_soon(deliver_until_killed, port, acknowledged)
                while len(acknowledged) < 50:
                    await trio.sleep(0.01)
                sink.send_signal(signal.SIGKILL)
    finally:
        sink.kill()
        sink.wait(timeout=TEST_TIMEOUT)
    stored = {}
    for message in mailbox.Maildir(maildir).values():
        match = re.search(r"\bid (\S+)", message["Received"] or "")
        assert match is not None, message["Received"]
        stored[match.group(1)] = message
    missing = [queue_id for queue_id in acknowledged if queue_id not in stored]
    assert not missing, f"{len(missing)} acknowledged messages lost: {missing[:5]}"
    for queue_id in acknowledged:
        assert stored[queue_id].get_payload().count("line of text") == 200
