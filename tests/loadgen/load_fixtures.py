"""Fixtures for the load generator's tests: servers on loopback (aiosmtpd, Postfix smtp-sink,
and a small trio SMTP server written here that supports BDAT and misbehaves on request).

A plugin module (``pytest_plugins = ("load_fixtures",)`` in each test module) rather than a
conftest.py: other tests import the top-level conftest by module name, and a second conftest
module would shadow it. Every helper that waits is bounded; servers stop when the test ends.
"""

from __future__ import annotations

import functools
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import AuthResult

from mailstorm.load.config import LoadConfig, Target
from mailstorm.load.runner import run_load
from mailstorm.load.stats import RunStats
from mailstorm.ports import free_port
from mailstorm.wire.data import BareLinefeedPolicy, DataReader

SMTP_SINK = "/usr/sbin/smtp-sink"


#: Every bounded run of the load generator in these tests ends within this many seconds.
RUN_LIMIT = 30


async def run_bounded(config: LoadConfig) -> RunStats:
    """Run the load, bounded in time, and check that every message ended exactly once."""
    with trio.fail_after(RUN_LIMIT):
        stats = await run_load(config)
    assert stats.attempted == stats.delivered + stats.failed
    return stats


def make_config(port: int, **options: Any) -> LoadConfig:
    """A quiet LoadConfig for 127.0.0.1:port with a short timeout unless given."""
    target = options.pop("target", None) or Target("127.0.0.1", port)
    options.setdefault("timeout", 10.0)
    options.setdefault("quiet", True)
    return LoadConfig.from_options(target, **options)


# ----------------------------------------------------------------------------------------
# aiosmtpd
# ----------------------------------------------------------------------------------------


class CountingHandler:
    """Counts messages and recipients; refuses recipients named refuse*; optionally announces
    PIPELINING."""

    def __init__(self, *, pipelining: bool = False, lmtp: bool = False) -> None:
        self.lmtp = lmtp
        self.messages = 0
        self.rcpts = 0
        self.bodies: list[bytes] = []
        self.pipelining = pipelining
        self._lock = threading.Lock()

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address.startswith("refuse"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.messages += 1
            self.rcpts += len(envelope.rcpt_tos)
            if len(self.bodies) < 5:
                self.bodies.append(envelope.original_content or envelope.content)
        if self.lmtp:
            # LMTP (RFC 2033): one reply per recipient; aiosmtpd sends the lines as given.
            return "\r\n".join("250 2.0.0 OK" for _ in envelope.rcpt_tos)
        return "250 2.0.0 OK"


class _LMTPController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


def _accept_alice(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> Any:
    ok = auth_data.login == b"alice" and auth_data.password == b"wonderland"
    # handled=False: aiosmtpd then sends its 535 itself (with True it sends nothing).
    return AuthResult(success=ok, handled=False)


@dataclass
class AiosmtpdServer:
    controller: Controller
    handler: CountingHandler
    port: int


@pytest.fixture
def aiosmtpd_server() -> Iterator[Callable[..., AiosmtpdServer]]:
    """Start aiosmtpd on 127.0.0.1 (``lmtp``, ``pipelining``, ``auth``, ``tls_context`` for
    STARTTLS, ``ssl_context`` for implicit TLS); stopped when the test ends."""
    started: list[Controller] = []

    def start(
        *,
        lmtp: bool = False,
        pipelining: bool = False,
        auth: bool = False,
        **kwargs: Any,
    ) -> AiosmtpdServer:
        handler = CountingHandler(pipelining=pipelining, lmtp=lmtp)
        port = free_port()
        if auth:
            kwargs.setdefault("authenticator", _accept_alice)
            kwargs.setdefault("auth_require_tls", False)
        cls = _LMTPController if lmtp else Controller
        # server_hostname is fixed so aiosmtpd does no DNS lookup of its own name.
        controller = cls(
            handler, hostname="127.0.0.1", port=port, server_hostname="aio.test", **kwargs
        )
        controller.start()
        started.append(controller)
        return AiosmtpdServer(controller, handler, port)

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture
def server_tls_context(tls_files: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls_files.cert), str(tls_files.key))
    return ctx


@pytest.fixture
def ca_file(tls_files: Any) -> str:
    return str(Path(tls_files.cert).parent / "ca.pem")


# ----------------------------------------------------------------------------------------
# Postfix smtp-sink
# ----------------------------------------------------------------------------------------


@dataclass
class SmtpSink:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def counters(self) -> dict[str, int]:
        """The latest of smtp-sink's running counters (``-c``): sess, quit, mesg."""
        text = self.log.read_text(errors="replace")
        found = re.findall(r"sess=(\d+) quit=(\d+) mesg=(\d+)", text)
        if not found:
            return {"sess": 0, "quit": 0, "mesg": 0}
        sess, quit_, mesg = found[-1]
        return {"sess": int(sess), "quit": int(quit_), "mesg": int(mesg)}

    def wait_for_messages(self, expected: int, timeout: float = 10.0) -> int:
        """smtp-sink updates its counters when sessions end; wait for them to settle."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.counters()["mesg"]
            if count >= expected or time.monotonic() > deadline:
                return count
            time.sleep(0.05)


@pytest.fixture
def postfix_smtp_sink(tmp_path: Path) -> Iterator[Callable[..., SmtpSink]]:
    if not Path(SMTP_SINK).exists():
        pytest.skip(f"Postfix smtp-sink not installed ({SMTP_SINK}; Debian package postfix)")
    started: list[SmtpSink] = []

    def start(*options: str) -> SmtpSink:
        port = free_port()
        log = tmp_path / f"smtp-sink-{port}.log"
        with log.open("wb") as out:
            # -u nobody: it refuses to run as root otherwise; -c: running counters on stdout;
            # backlog 1024 so a burst of connects is not refused by the kernel.
            process = subprocess.Popen(
                [SMTP_SINK, "-u", "nobody", "-c", *options, f"127.0.0.1:{port}", "1024"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        sink = SmtpSink(process, port, log)
        started.append(sink)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"smtp-sink did not start: {log.read_text()}") from None
                time.sleep(0.05)
        # The probe connection above counts as a session; wait until it is counted.
        while sink.counters()["sess"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        return sink

    yield start
    for sink in started:
        sink.process.terminate()
        try:
            sink.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            sink.process.kill()


# ----------------------------------------------------------------------------------------
# A small trio SMTP server that can misbehave
# ----------------------------------------------------------------------------------------


@dataclass
class FakeBehavior:
    """What the fake server does. Replies are bytes sent as they are."""

    banner: bytes | None = b"220 fake.test ESMTP\r\n"
    extensions: tuple[str, ...] = ("PIPELINING", "CHUNKING", "8BITMIME", "SIZE 100000000")
    mail_reply: bytes = b"250 2.1.0 ok\r\n"
    rcpt_reply: bytes = b"250 2.1.5 ok\r\n"
    data_reply: bytes = b"354 go ahead\r\n"
    eod_reply: bytes = b"250 2.0.0 queued\r\n"
    #: Close the connection (no reply) when this command arrives: "MAIL", "DATA", ...
    drop_on: str | None = None
    #: Never reply to this command (but keep reading).
    hang_on: str | None = None
    #: Seconds to wait before answering the end of each message's content.
    eod_delay: float = 0.0
    #: Close the connection, unanswered, when this many messages' content has arrived on it.
    drop_after_messages: int = 0
    #: Every n-th message (1-based) gets ``eod_reply_nth`` instead of ``eod_reply``.
    nth: int = 0
    eod_reply_nth: bytes = b"451 4.3.0 try again\r\n"
    #: Accept each connection and close it at once, before any banner.
    close_at_once: bool = False
    #: After this many messages answered on a connection, answer the next MAIL with a 421
    #: and close (Exim's smtp_accept_max_per_connection, Postfix's rate limits).
    max_messages_per_connection: int = 0
    #: Close the connection (no 421) right after answering this many messages on it, as a
    #: server closing idle connections does.
    close_after_messages: int = 0
    #: The message with this number (1-based, over the server's life) waits ``stall``
    #: seconds before its end of data is answered.
    stall_at: int = 0
    stall: float = 0.0


@dataclass
class FakeServer:
    port: int
    behavior: FakeBehavior
    #: Messages answered with 2xx, and messages whose content was complete.
    delivered: int = 0
    ended: int = 0
    connections: int = 0
    pipelined_groups: int = 0
    #: Messages whose MAIL had arrived together with the previous message's content.
    mail_behind_content: int = 0
    #: The client address of every connection.
    peers: list[str] = field(default_factory=list)
    #: trio clock reading at each accepted connection.
    connected_at: list[float] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    #: Connections ended by ``max_messages_per_connection`` or ``close_after_messages``.
    limited: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.connected_at.append(trio.current_time())
        self.peers.append(stream.socket.getpeername()[0])
        b = self.behavior
        buf = bytearray()
        try:
            if b.close_at_once:
                return
            if b.banner is None:
                await trio.sleep_forever()
            await stream.send_all(b.banner)
            content = bytearray()
            accepted = 0
            on_connection = 0
            answered = 0
            while True:
                while b"\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                line, _, rest = bytes(buf).partition(b"\r\n")
                buf = bytearray(rest)
                verb = line.split(b" ", 1)[0].upper().decode()
                if len(self.commands) < 1000:
                    self.commands.append(line.decode(errors="replace"))
                if verb == b.drop_on:
                    return
                if verb == b.hang_on:
                    await trio.sleep_forever()
                if verb in ("EHLO", "LHLO"):
                    lines = ["fake.test", *b.extensions]
                    wire = "".join(
                        f"250{'-' if i < len(lines) - 1 else ' '}{t}\r\n"
                        for i, t in enumerate(lines)
                    )
                    await stream.send_all(wire.encode())
                elif verb == "HELO":
                    await stream.send_all(b"250 fake.test\r\n")
                elif verb == "MAIL" and (
                    b.max_messages_per_connection
                    and answered >= b.max_messages_per_connection
                ):
                    self.limited += 1
                    await stream.send_all(b"421 4.7.0 too many messages on this connection\r\n")
                    return
                elif verb == "MAIL":
                    content = bytearray()
                    accepted = 0
                    # Pipelined (RFC 2920): the whole group arrived before the MAIL reply.
                    if b"DATA\r\n" in buf or b"BDAT " in buf:
                        self.pipelined_groups += 1
                    await stream.send_all(b.mail_reply)
                elif verb == "RCPT":
                    accepted += b.rcpt_reply.startswith(b"2")
                    await stream.send_all(b.rcpt_reply)
                elif verb == "DATA" and not accepted:
                    await stream.send_all(b"554 5.5.1 no valid recipients\r\n")
                elif verb == "DATA":
                    await stream.send_all(b.data_reply)
                    if not b.data_reply.startswith(b"354"):
                        continue
                    reader = DataReader(0, BareLinefeedPolicy.NORMALIZE)
                    while (result := reader.read(buf)) is None:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buf += data
                    on_connection += 1
                    if on_connection == b.drop_after_messages:
                        return
                    if buf.startswith(b"MAIL "):
                        self.mail_behind_content += 1
                    await self._delivered(stream, result[0] or b"")
                    answered += 1
                    if answered == b.close_after_messages:
                        self.limited += 1
                        return
                elif verb == "BDAT":
                    parts = line.split()
                    size = int(parts[1])
                    while len(buf) < size:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buf += data
                    content += buf[:size]
                    del buf[:size]
                    if not accepted:
                        await stream.send_all(b"554 5.5.1 no valid recipients\r\n")
                    elif len(parts) > 2 and parts[2].upper() == b"LAST":
                        await self._delivered(stream, bytes(content))
                        content = bytearray()
                    else:
                        await stream.send_all(b"250 2.0.0 %d octets\r\n" % size)
                elif verb == "RSET":
                    await stream.send_all(b"250 2.0.0 ok\r\n")
                elif verb == "QUIT":
                    await stream.send_all(b"221 2.0.0 bye\r\n")
                    return
                else:
                    await stream.send_all(b"502 5.5.2 what\r\n")
        except trio.BrokenResourceError:
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _delivered(self, stream: trio.SocketStream, body: bytes) -> None:
        """A complete message: answer it (every ``nth`` with ``eod_reply_nth``)."""
        self.ended += 1
        b = self.behavior
        if b.eod_delay:
            await trio.sleep(b.eod_delay)
        if b.stall_at and self.ended == b.stall_at:
            await trio.sleep(b.stall)
        reply = b.eod_reply_nth if b.nth and self.ended % b.nth == 0 else b.eod_reply
        await stream.send_all(reply)
        if reply.startswith(b"2"):
            self.delivered += 1
            if len(self.bodies) < 20:
                self.bodies.append(body)


@pytest.fixture
async def fake_smtp(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Any]]:
    """Start the fake trio server in the test's nursery: ``await fake_smtp(**behavior)``."""

    async def start(host: str = "127.0.0.1", **behavior: Any) -> FakeServer:
        server = FakeServer(0, FakeBehavior(**behavior))
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, server.handle, 0, host=host)
        )
        server.port = listeners[0].socket.getsockname()[1]
        return server

    yield start
    nursery.cancel_scope.cancel()


@pytest.fixture
def load_config() -> Callable[..., LoadConfig]:
    """``load_config(port, **options)``: a quiet LoadConfig for 127.0.0.1:port."""
    return make_config


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    return free_port()
