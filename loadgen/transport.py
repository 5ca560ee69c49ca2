"""A lean trio byte stream over a connected TCP socket, for the load generator's hot path.

This module owns the plain-TCP transport of a load session. ``trio.SocketStream`` does the same
job, but wraps every call in a context manager, a conflict detector and an extra scheduler
round trip; a load generator making two writes and two reads per message pays for that on every
message. Here a read or write that can complete at once does so without yielding, and only an
operation that would block waits on the socket (which is a checkpoint). The session loop adds
its own cancellation point per message. It never parses SMTP and never times anything.
"""

from __future__ import annotations

import socket

import trio

__all__ = ["SocketTransport"]


class SocketTransport(trio.abc.Stream):
    """A ``trio.abc.Stream`` over a connected, non-blocking stdlib socket it owns."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        # Replies to pipelined commands must not wait for Nagle's algorithm.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self._sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        if sent == len(data):
            return  # the usual case: the whole write fit in the socket buffer
        view = memoryview(data)[sent:]
        while view:
            await trio.lowlevel.wait_writable(sock)
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        sock = self._sock
        size = max_bytes or 65536
        while True:
            try:
                return sock.recv(size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def aclose(self) -> None:
        sock = self._sock
        if sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        await trio.lowlevel.checkpoint()
