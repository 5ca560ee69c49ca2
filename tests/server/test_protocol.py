"""The sink over real sockets: byte-exact storage, pipelining, limits, failures, smuggling."""

from __future__ import annotations

import mailbox
import os
import re
import shutil
from pathlib import Path
from typing import Any

import trio
from conftest import TEST_TIMEOUT, SMTPClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstorm.sink import Address, SinkConfig, SinkServer
from mailstorm.wire.data import dot_stuff, normalize_line_endings

# The trace ends with the Received header's date (RFC 5322 form). Matching up to it, rather
# than "header lines and their TAB continuations", keeps a body that starts with a TAB whole.
_TRACE_END = re.compile(
    rb"\AReturn-Path:[^\r\n]*\r\nReceived: .*?;(?: |\r\n\t)"
    rb"[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n",
    re.DOTALL,
)


def stored_messages(maildir: Path) -> list[bytes]:
    """Every message in new/, as exact bytes, oldest name first."""
    return [(maildir / "new" / name).read_bytes() for name in sorted(os.listdir(maildir / "new"))]


def strip_trace(stored: bytes) -> bytes:
    m = _TRACE_END.match(stored)
    assert m is not None, stored[:300]
    return stored[m.end():]


async def maildir_session(
    start_sink: Any, connect: Any, tmp_path: Path
) -> tuple[SinkServer, SMTPClient, Path]:
    """A sink storing to a fresh Maildir, and a client that has said EHLO to it."""
    folder = tmp_path / "md"
    server = await start_sink(store=f"maildir:{folder}")
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    return server, client, folder


async def send_message(client: SMTPClient, body_wire: bytes, *, pieces: int = 1) -> str:
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await client.cmd("RCPT TO:<b@example.com>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    step = max(1, len(body_wire) // pieces)
    for i in range(0, len(body_wire), step):
        await client.send(body_wire[i:i + step])
    reply = await client.reply()
    return f"{reply.code} {reply.text}"


_bodies = st.lists(
    st.binary(max_size=60) | st.sampled_from([b".", b"..", b".\r\n", b"\r\n.", b"\n", b"\r",
                                               b"From x\r\n", b"\xff\xfe"]),
    max_size=40,
).map(b"".join)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, pieces=st.integers(min_value=1, max_value=7))
async def test_any_body_is_stored_byte_exact_over_the_wire(body: bytes, pieces: int) -> None:
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"mailstorm-prop-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    server = SinkServer.from_config(SinkConfig(listen=(Address("127.0.0.1", 0),),
                                               store=f"maildir:{folder}"))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            client = await SMTPClient.connect(server.addresses[0])
            await client.reply()
            await client.cmd("EHLO prop.test")
            assert (await send_message(client, dot_stuff(body), pieces=pieces)).startswith("250")
            await client.cmd("QUIT")
            await client.aclose()
            server.shutdown()
        expected = normalize_line_endings(body)
        if expected and not expected.endswith(b"\r\n"):
            expected += b"\r\n"
        (stored,) = stored_messages(folder)
        assert strip_trace(stored) == expected
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_maildir_is_readable_by_mailbox(start_sink, connect, tmp_path: Path) -> None:
    server = await start_sink(store=f"maildir:{tmp_path / 'md'}")
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    body = b"Subject: one\r\n\r\nline\r\n.dot\r\nFrom here\r\n"
    for _ in range(3):
        assert (await send_message(client, dot_stuff(body))).startswith("250 2.0.0 OK: queued")
    box = mailbox.Maildir(str(tmp_path / "md"), factory=None)
    assert len(box) == 3
    for key in box.iterkeys():
        raw = box.get_bytes(key)
        assert strip_trace(raw) == body
        assert box[key]["Subject"] == "one"
        assert "from c.test" in box[key]["Received"]
    assert os.listdir(tmp_path / "md" / "tmp") == []
    assert server.stats.messages == 3 and server.stats.bytes == 3 * len(body)


async def test_mbox_store_is_exact_and_quoted(start_sink, connect, tmp_path: Path) -> None:
    path = tmp_path / "sink.mbox"
    server = await start_sink(store=f"mbox:{path}")
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    bodies = [b"Subject: a\r\n\r\nFrom the start\r\n>From quoted\r\n", b"Subject: b\r\n\r\nx\r\n"]
    for body in bodies:
        assert (await send_message(client, dot_stuff(body))).startswith("250")
    box = mailbox.mbox(str(path))
    assert [m["Subject"] for m in box] == ["a", "b"]
    raw = path.read_bytes()
    assert b"\n>From the start\r\n>>From quoted\r\n" in raw
    assert raw.startswith(b"From a@example.com ")


async def test_pipelined_transactions_over_the_wire(start_sink, connect) -> None:
    server = await start_sink()
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    group = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n"
    await client.send(group)
    assert [r.code for r in await client.replies(4)] == [250, 250, 250, 354]
    await client.send(b"one\r\n.\r\n" + group)
    assert [r.code for r in await client.replies(5)] == [250, 250, 250, 250, 354]
    await client.send(b"two\r\n.\r\nQUIT\r\n")
    assert [r.code for r in await client.replies(2)] == [250, 221]
    assert server.stats.messages == 2 and server.stats.recipients == 4


async def test_oversize_message_over_the_wire(start_sink, connect) -> None:
    server = await start_sink(max_size=10_000)
    client = await connect(server.addresses[0])
    ehlo = await client.cmd("EHLO c.test")
    assert "SIZE 10000" in ehlo.lines
    assert (await client.cmd("MAIL FROM:<a@b> SIZE=20000")).code == 552
    reply = await send_message(client, dot_stuff(b"x" * 200 + b"\r\n") * 1, pieces=1)
    assert reply.startswith("250")
    reply = await send_message(client, dot_stuff((b"y" * 998 + b"\r\n") * 200), pieces=9)
    assert reply.startswith("552 5.3.4")
    assert (await send_message(client, dot_stuff(b"ok\r\n"))).startswith("250")
    assert server.stats.messages == 2
    assert server.stats.messages_refused == 1


async def test_storage_failure_gives_451_and_nothing_half_written(
    start_sink, connect, tmp_path: Path
) -> None:
    server, client, folder = await maildir_session(start_sink, connect, tmp_path)
    assert (await send_message(client, dot_stuff(b"first\r\n"))).startswith("250")
    kept = stored_messages(folder)
    # Break the store under the running server: new/ becomes a regular file.
    shutil.rmtree(folder / "new")
    (folder / "new").write_bytes(b"")
    assert (await send_message(client, dot_stuff(b"second\r\n"))).startswith("451 4.3.0")
    assert os.listdir(folder / "tmp") == []
    assert (await client.cmd("NOOP")).code == 250
    assert server.stats.storage_failures == 1 and server.stats.messages == 1
    (folder / "new").unlink()
    (folder / "new").mkdir()
    assert (await send_message(client, dot_stuff(b"third\r\n"))).startswith("250")
    assert len(kept) == 1 and strip_trace(stored_messages(folder)[0]) == b"third\r\n"


async def test_disconnect_mid_data_leaves_nothing(start_sink, connect, tmp_path: Path) -> None:
    server, client, folder = await maildir_session(start_sink, connect, tmp_path)
    await client.cmd("MAIL FROM:<a@b>")
    await client.cmd("RCPT TO:<c@d>")
    await client.cmd("DATA")
    await client.send(b"Subject: cut\r\n\r\nhalf of it\r\n")
    await client.aclose()
    with trio.fail_after(TEST_TIMEOUT):
        while server.stats.sessions_active:
            await trio.sleep(0.01)
    assert os.listdir(folder / "new") == [] and os.listdir(folder / "tmp") == []
    assert server.stats.messages == 0


async def test_smuggling_over_the_wire_yields_one_message(
    start_sink, connect, tmp_path: Path
) -> None:
    server, client, folder = await maildir_session(start_sink, connect, tmp_path)
    await client.cmd("MAIL FROM:<a@b>")
    await client.cmd("RCPT TO:<c@d>")
    await client.cmd("DATA")
    for end in (b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"):
        await client.send(b"text" + end + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\n")
    await client.send(b"the end\r\n.\r\n")
    reply = await client.reply()
    assert reply.code == 250
    assert (await client.cmd("RCPT TO:<v@y>")).code == 503
    (stored,) = stored_messages(folder)
    assert strip_trace(stored).count(b"MAIL FROM:<evil@x>") == 5
    assert server.stats.messages == 1


async def test_bare_lf_reject_policy_over_the_wire(start_sink, connect) -> None:
    from mailstorm.wire.data import BareLinefeedPolicy

    server = await start_sink(bare_linefeed=BareLinefeedPolicy.REJECT)
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    assert (await send_message(client, b"bad\nline\r\n.\r\n")).startswith("550 5.6.0")
    assert (await send_message(client, b"good\r\n.\r\n")).startswith("250")
    assert server.stats.messages == 1
    assert server.stats.messages_refused == 1


async def test_bdat_over_the_wire(start_sink, connect, tmp_path: Path) -> None:
    server, client, folder = await maildir_session(start_sink, connect, tmp_path)
    await client.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 7\r\nSubjectBDAT 10 LAST\r\n"
                      b": x\r\n\r\n.\r\n")
    assert [r.code for r in await client.replies(4)] == [250, 250, 250, 250]
    (stored,) = stored_messages(folder)
    assert strip_trace(stored) == b"Subject: x\r\n\r\n.\r\n"
    assert server.stats.messages == 1
