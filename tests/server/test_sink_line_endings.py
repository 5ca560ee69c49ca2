"""Bare CR and LF over real sockets (issue 14, defect 2): each shape the outside prober found,
sent to a sink that stores to a Maildir, under ``--bare-lf reject`` and ``normalize``.

``reject`` must answer 550 5.6.0, count the message as refused and store nothing; ``normalize``
must store every bare CR and LF as CRLF and keep a dot that only normalization put at the
start of a line. DATA and BDAT get the same policy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import SMTPClient

from mailstorm.sink import SinkServer
from mailstorm.wire.data import BareLinefeedPolicy

REJECT, NORMALIZE = BareLinefeedPolicy.REJECT, BareLinefeedPolicy.NORMALIZE
HEADER = b"Subject: line endings\r\n\r\n"


def stored_contents(maildir: Path) -> list[bytes]:
    """Every message in new/, without the sink's two trace headers (Return-Path and a
    one-line Received), oldest name first."""
    contents = []
    for name in sorted(os.listdir(maildir / "new")):
        stored = (maildir / "new" / name).read_bytes()
        assert stored.startswith(b"Return-Path:"), stored[:200]
        contents.append(stored[stored.index(b"\r\n" + HEADER) + 2 :])
    return contents


async def sink_and_client(
    start_sink: Any, connect: Any, tmp_path: Path, policy: BareLinefeedPolicy
) -> tuple[SinkServer, SMTPClient, Path]:
    folder = tmp_path / "md"
    server = await start_sink(store=f"maildir:{folder}", bare_linefeed=policy)
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    return server, client, folder


async def send_data(client: SMTPClient, wire: bytes) -> str:
    """One transaction with DATA; ``wire`` is everything after the 354, marker included."""
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await client.cmd("RCPT TO:<b@example.com>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    await client.send(wire)
    reply = await client.reply()
    return f"{reply.code} {reply.text}"


async def send_bdat(client: SMTPClient, chunks: list[bytes]) -> list[str]:
    """One transaction with BDAT, one chunk per command (the last one LAST); every reply."""
    assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await client.cmd("RCPT TO:<b@example.com>")).code == 250
    replies = []
    for i, chunk in enumerate(chunks):
        last = " LAST" if i == len(chunks) - 1 else ""
        await client.send(b"BDAT %d%s\r\n" % (len(chunk), last.encode()) + chunk)
        reply = await client.reply()
        replies.append(f"{reply.code} {reply.text}")
    return replies


async def expect_refused_then_usable(
    server: SinkServer, client: SMTPClient, folder: Path, reply: str
) -> None:
    """The reject policy's promise: 550 5.6.0, counted as refused, nothing stored, and the
    session goes on (a clean message after it is stored)."""
    assert reply.startswith("550 5.6.0"), reply
    assert os.listdir(folder / "new") == [] and os.listdir(folder / "tmp") == []
    assert server.stats.messages_refused == 1 and server.stats.messages == 0
    assert (await send_data(client, HEADER + b"clean\r\n.\r\n")).startswith("250")
    assert stored_contents(folder) == [HEADER + b"clean\r\n"]


#: DATA shapes: the body sent after 354 (without the marker) and what normalize stores.
DATA_SHAPES = {
    # A bare CR, then later a bare LF: the old check counted them as a CRLF.
    "cr-then-lf": (b"foo\rbar\nbaz\r\n", b"foo\r\nbar\r\nbaz\r\n"),
    # The smuggling shape: a dot between a bare CR and a bare LF.
    "cr-dot-lf": (b"one\r.\ntwo\r\n", b"one\r\n.\r\ntwo\r\n"),
    # A dot on a line that only normalization makes: kept, not unstuffed.
    "lf-dot-lf": (b"one\n.\ntwo\r\n", b"one\r\n.\r\ntwo\r\n"),
}


@pytest.mark.parametrize("shape", list(DATA_SHAPES))
async def test_data_shape_is_rejected(start_sink, connect, tmp_path: Path, shape: str) -> None:
    server, client, folder = await sink_and_client(start_sink, connect, tmp_path, REJECT)
    body, _ = DATA_SHAPES[shape]
    reply = await send_data(client, HEADER + body + b".\r\n")
    await expect_refused_then_usable(server, client, folder, reply)


@pytest.mark.parametrize("shape", list(DATA_SHAPES))
async def test_data_shape_is_normalized(
    start_sink, connect, tmp_path: Path, shape: str
) -> None:
    server, client, folder = await sink_and_client(start_sink, connect, tmp_path, NORMALIZE)
    body, stored = DATA_SHAPES[shape]
    assert (await send_data(client, HEADER + body + b".\r\n")).startswith("250")
    assert stored_contents(folder) == [HEADER + stored]
    assert server.stats.messages == 1 and server.stats.messages_refused == 0


async def test_data_shape_split_across_writes(start_sink, connect, tmp_path: Path) -> None:
    """The CR of a CRLF at the end of one write and its LF at the start of the next are a
    CRLF; a bare CR at the end of a write stays bare."""
    server, client, folder = await sink_and_client(start_sink, connect, tmp_path, REJECT)
    codes = []
    for pieces in ([HEADER + b"a\r", b"\nb\r\n.\r\n"], [HEADER + b"a\r", b"b\r\n.\r\n"]):
        assert (await client.cmd("MAIL FROM:<a@example.com>")).code == 250
        assert (await client.cmd("RCPT TO:<b@example.com>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        for piece in pieces:
            await client.send(piece)
        reply = await client.reply()
        codes.append(reply.code)
    assert codes == [250, 550]
    assert stored_contents(folder) == [HEADER + b"a\r\nb\r\n"]
    assert server.stats.messages == 1 and server.stats.messages_refused == 1


BDAT_CONTENT = HEADER + b"line1\nline2\rline3\n.\nend"


async def test_bdat_shape_is_rejected(start_sink, connect, tmp_path: Path) -> None:
    server, client, folder = await sink_and_client(start_sink, connect, tmp_path, REJECT)
    (reply,) = await send_bdat(client, [BDAT_CONTENT])
    await expect_refused_then_usable(server, client, folder, reply)


async def test_bdat_shape_in_chunks_is_rejected(start_sink, connect, tmp_path: Path) -> None:
    server, client, folder = await sink_and_client(start_sink, connect, tmp_path, REJECT)
    cut = BDAT_CONTENT.index(b"\rline3")
    replies = await send_bdat(client, [BDAT_CONTENT[:cut + 1], BDAT_CONTENT[cut + 1 :]])
    assert replies[0].startswith("250 2.0.0")
    await expect_refused_then_usable(server, client, folder, replies[-1])


async def test_bdat_shape_is_normalized_with_its_dot(
    start_sink, connect, tmp_path: Path
) -> None:
    server, client, folder = await sink_and_client(start_sink, connect, tmp_path, NORMALIZE)
    (reply,) = await send_bdat(client, [BDAT_CONTENT])
    assert reply.startswith("250"), reply
    assert stored_contents(folder) == [HEADER + b"line1\r\nline2\r\nline3\r\n.\r\nend"]
    assert server.stats.messages == 1 and server.stats.messages_refused == 0


async def test_bdat_crlf_split_between_chunks_is_clean(
    start_sink, connect, tmp_path: Path
) -> None:
    _, client, folder = await sink_and_client(start_sink, connect, tmp_path, REJECT)
    replies = await send_bdat(client, [HEADER + b"a\r", b"\n..b\r\n"])
    assert replies[-1].startswith("250"), replies
    # BDAT has no dot-stuffing: both dots are content.
    assert stored_contents(folder) == [HEADER + b"a\r\n..b\r\n"]
