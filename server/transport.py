"""How a session moves bytes: a plain socket fast path, and TLS through ``trio.SSLStream``.

Why not always ``trio.SocketStream``: its ``send_all`` and ``receive_some`` each pass through
two scheduler checkpoints plus conflict detection, which dominated the sink's per-command CPU
profile. ``PlainTransport`` instead calls the non-blocking stdlib socket directly and waits
with ``trio.lowlevel.wait_readable``/``wait_writable`` only when the kernel says it must. Waits
remain trio waits: they honour cancel scopes (timeouts, shutdown) like any other.

Fairness: a receive that finds data already buffered does not wait, so a client streaming a
large body could monopolize the event loop; every ``_FAIRNESS_READS`` such reads the
transport yields once.

Resource handling: ``aclose`` closes the socket (or the TLS stream and its socket) and is
idempotent. Error handling: a peer that resets or vanishes raises ``trio.BrokenResourceError``
from either transport, so the session has one error to handle.
"""

from __future__ import annotations

import socket
import ssl

import trio

__all__ = ["PlainTransport", "TLSTransport", "Transport"]

#: Bytes asked of the kernel per receive: a whole pipelined group or a large DATA block.
RECEIVE_SIZE = 65536
#: Receives that found data waiting, in a row, before yielding to other tasks once.
_FAIRNESS_READS = 16


class PlainTransport:
    """A connected, non-blocking stdlib socket driven with trio's I/O manager."""

    __slots__ = ("_eager", "sock")

    tls = False

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        # Replies are small and latency-bound: never wait for Nagle.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._eager = 0

    def peer(self) -> tuple[str, int]:
        try:
            peer = self.sock.getpeername()
        except OSError:
            return "unknown", 0
        return str(peer[0]), int(peer[1])

    async def receive(self) -> bytes:
        sock = self.sock
        if self._eager < _FAIRNESS_READS:
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            else:
                self._eager += 1
                return data
        else:
            await trio.lowlevel.checkpoint()
        self._eager = 0
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc

    async def send_all(self, data: bytes) -> None:
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc
        if sent == len(data):
            return
        view = memoryview(data)
        while sent < len(data):
            await trio.lowlevel.wait_writable(sock)
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc

    def start_tls(self, context: ssl.SSLContext) -> TLSTransport:
        """Hand the socket to a TLS transport (this one must not be used afterwards)."""
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(self.sock))
        return TLSTransport(trio.SSLStream(stream, context, server_side=True))

    async def aclose(self) -> None:
        self.sock.close()


class TLSTransport:
    """TLS over a trio ``SSLStream`` (STARTTLS or implicit TLS)."""

    __slots__ = ("stream",)

    tls = True

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream

    async def handshake(self) -> None:
        await self.stream.do_handshake()

    def details(self) -> tuple[str | None, str | None]:
        """The negotiated protocol version and cipher, for the Received header."""
        cipher = self.stream.cipher()
        return self.stream.version(), cipher[0] if cipher else None

    async def receive(self) -> bytes:
        return await self.stream.receive_some(RECEIVE_SIZE)

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


Transport = PlainTransport | TLSTransport
