"""Shared fixtures: a real sink on a loopback port, a raw SMTP client, test certificates.

Everything talks over real sockets; nothing is mocked. Servers bind port 0 so tests can run
side by side.
"""

from __future__ import annotations

import base64
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from mailstorm.sink import Address, SinkConfig, SinkServer
from mailstorm.wire.replies import ParsedReply, ReplyParser

# The load generator's fixture plugin is also imported by name (for its helpers); register it
# so that its asserts are rewritten whichever import comes first.
pytest.register_assert_rewrite("load_fixtures")

#: Every network wait in a test is bounded by this.
TEST_TIMEOUT = 20.0


@dataclass
class TLSFiles:
    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    folder = tmp_path_factory.mktemp("tls")
    cert_path = folder / "cert.pem"
    key_path = folder / "key.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return TLSFiles(ca, cert_path, key_path)


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.txt"
    path.write_text("# test users\nalice:wonderland\nbob:pa:ss word\n")
    return path


SinkFactory = Callable[..., Awaitable[SinkServer]]


@pytest.fixture
async def start_sink(nursery: trio.Nursery) -> AsyncIterator[SinkFactory]:
    """Start a sink with ``SinkConfig`` overrides; it is stopped when the test ends."""
    servers: list[SinkServer] = []

    async def start(**overrides: Any) -> SinkServer:
        overrides.setdefault("listen", (Address("127.0.0.1", 0),))
        overrides.setdefault("hostname", "sink.test")
        server = SinkServer.from_config(SinkConfig(**overrides))
        await nursery.start(server.serve)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


class SMTPClient:
    """A raw SMTP client over a real socket: send exact bytes, read parsed replies."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.parser = ReplyParser()

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> SMTPClient:
        with trio.fail_after(TEST_TIMEOUT):
            stream = await trio.open_tcp_stream(*address)
        return cls(stream)

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        with trio.fail_after(TEST_TIMEOUT):
            await self.stream.send_all(data)

    async def reply(self) -> ParsedReply:
        with trio.fail_after(TEST_TIMEOUT):
            while True:
                reply = self.parser.next_reply()
                if reply is not None:
                    return reply
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("server closed the connection")
                self.parser.feed(data)

    async def replies(self, n: int) -> list[ParsedReply]:
        return [await self.reply() for _ in range(n)]

    async def cmd(self, line: str) -> ParsedReply:
        await self.send(line + "\r\n")
        return await self.reply()

    async def expect_closed(self) -> None:
        """The server closes the connection (after any replies already read)."""
        with trio.fail_after(TEST_TIMEOUT):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                self.parser.feed(data)
                if self.parser.next_reply() is None and not self.parser.buffered:
                    continue

    async def starttls(self, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        tls = trio.SSLStream(self.stream, ctx, server_hostname=server_hostname)
        with trio.fail_after(TEST_TIMEOUT):
            await tls.do_handshake()
        self.stream = tls

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[tuple[str, int]], Awaitable[SMTPClient]]]:
    """Open raw SMTP clients that read the banner first; all are closed at the end."""
    clients: list[SMTPClient] = []

    async def open_client(address: tuple[str, int], *, banner: bool = True) -> SMTPClient:
        client = await SMTPClient.connect(address)
        clients.append(client)
        if banner:
            reply = await client.reply()
            assert reply.code == 220, reply
        return client

    yield open_client
    for client in clients:
        await client.aclose()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class TaskSteps(trio.abc.Instrument):
    """Counts the scheduler steps of the tasks whose names end with ``suffix``: how often a
    session's task was woken, which the inline paths are there to avoid."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.suffix):
            self.steps += 1


#: How long a test waits for a line from a process it started (the machines are shared).
OUTPUT_TIMEOUT = 60.0


def wait_for_output(path: Path, pattern: str, timeout: float = OUTPUT_TIMEOUT) -> re.Match[str]:
    """Wait until the file a process writes its output to has a match for ``pattern``."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, path.read_text())
        if found:
            return found
        assert time.monotonic() < deadline, f"no {pattern!r} in:\n{path.read_text()}"
        time.sleep(0.05)
