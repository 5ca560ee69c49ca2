"""A lean trio byte stream over a connected TCP socket: the hot-path transport of both shells.

``trio.SocketStream`` does the same job, but wraps every call in a context manager, a conflict
detector and two scheduler checkpoints; in the sink's profile that cost more than the send and
recv system calls themselves. Here a read or write that can complete at once does so without
yielding, and only an operation that would block waits, with ``trio.lowlevel.wait_readable`` /
``wait_writable``, which are ordinary trio waits (cancellable, so timeouts and shutdown work).

After a write, the peer is only now reading what was sent, so its answer cannot be there
yet: the next read waits for readability first instead of trying a recv() that would only
fail with EAGAIN (a wasted system call and exception on every request/response turn).

Readiness: given a ``ReadinessHub`` (``mailstorm._net.readiness``), the stream learns that its
socket is readable or writable from the hub's edge-triggered epoll set, registered once,
instead of re-arming trio's one-shot registration (an ``epoll_ctl`` system call) on every wait.

Every receive reports to the hub's state what it proved (``Readiness.after_read``): only a
read that found the socket empty lets a reader park; see the invariant in
``mailstorm._net.readiness``.

Inline mode (with a hub): a reader that has found the socket empty may leave the next
arrivals to a synchronous handler run on the hub's turn (``wait_inline``), which reads and
writes with ``receive_nowait`` and ``send_nowait``; the handler contract is in
``mailstorm._net.readiness``.

Fairness: a read that finds data waiting and a send that fits the socket buffer do not yield,
so a peer streaming a large body, or one far ahead of its replies, could keep its task running;
after ``FAIRNESS_STEPS`` such operations in a row (reads and sends together), the next one
yields once first. It is a ``trio.abc.Stream``, so ``trio.SSLStream`` wraps it for TLS.

It never parses SMTP and never times anything. Errors: a reset or vanished peer raises
``trio.BrokenResourceError``, as trio's own streams do.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

import trio

from .readiness import ReadinessHub

__all__ = ["FAIRNESS_STEPS", "RECEIVE_SIZE", "SocketTransport"]

#: Bytes asked of the kernel per receive: a whole pipelined group or a large DATA block.
RECEIVE_SIZE = 65536
#: Reads and sends that completed without waiting, in a row, before yielding to others once.
FAIRNESS_STEPS = 16


class SocketTransport(trio.abc.Stream):
    """A ``trio.abc.Stream`` over a connected, non-blocking stdlib socket it owns."""

    __slots__ = ("_hub", "_just_sent", "_readiness", "_sock", "_unyielded")

    def __init__(self, sock: socket.socket, hub: ReadinessHub | None = None) -> None:
        sock.setblocking(False)
        # Replies (and pipelined command groups) must not wait for Nagle's algorithm.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        #: Reads and sends in a row that completed without yielding (see ``FAIRNESS_STEPS``).
        self._unyielded = 0
        self._just_sent = False
        #: With a hub, readiness comes from its edge-triggered epoll set (see
        #: ``mailstorm._net.readiness``); without one, from trio's own waits.
        self._hub = hub
        self._readiness = hub.register(sock) if hub is not None else None

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def peer(self) -> tuple[str, int]:
        """The peer's address and port, or ("unknown", 0) once it is gone."""
        try:
            peer = self._sock.getpeername()
        except OSError:
            return "unknown", 0
        return str(peer[0]), int(peer[1])

    async def connect(self, address: Any) -> None:
        """Connect the socket, made but not yet connected, to ``address`` (a resolved sockaddr).

        Leaner than ``trio.socket``'s connect, which resolves the address again on every call:
        a load generator opening thousands of connections a second pays that each time. The
        socket joins the hub's set before connect(2), so the edge that reports the connection
        made cannot be missed. Errors: ``OSError`` with connect(2)'s errno.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self._sock
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            await self._wait_writable()
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self._sock
        if self._unyielded >= FAIRNESS_STEPS:
            await self._yield_once()  # before the send: a cancelled send_all sent nothing
        self._just_sent = True
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        if sent == len(data):
            self._unyielded += 1
            return  # the usual case: the whole write fit in the socket buffer
        view = memoryview(data)[sent:]
        while view:
            self._unyielded = 0
            await self._wait_writable()
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        if self._readiness is None:
            await trio.lowlevel.wait_writable(self._sock)
        else:
            # An edge-triggered set only reports space after a send fell short; "might not
            # block" allows returning now, and send_all waits properly if it must.
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        sock = self._sock
        size = max_bytes or RECEIVE_SIZE
        readiness = self._readiness
        if self._just_sent:
            self._just_sent = False
            if readiness is None:
                self._unyielded = 0
                await trio.lowlevel.wait_readable(sock)
            elif not readiness.readable:
                self._unyielded = 0
                await readiness.wait_readable()
        if self._unyielded >= FAIRNESS_STEPS:
            await self._yield_once()
        while (data := self.receive_nowait(size)) is None:
            self._unyielded = 0
            if readiness is None:
                await trio.lowlevel.wait_readable(sock)
            else:
                await readiness.wait_readable()
        self._unyielded += 1
        return data

    async def _yield_once(self) -> None:
        """Let other tasks run (and a cancellation in): this task has not waited for a while."""
        self._unyielded = 0
        await trio.lowlevel.checkpoint()

    # ---- the inline mode: a reader that runs on the readiness hub's turn ---------------------

    @property
    def drained(self) -> bool:
        """Whether a read proved the socket empty since its last arrival (only with a hub):
        a reader may then park, and a later arrival wakes it."""
        readiness = self._readiness
        return readiness is not None and not readiness.readable

    async def wait_inline(self, handler: Callable[[], bool]) -> None:
        """Sleep while ``handler`` deals with the socket's arrivals by itself, on the hub's turn.

        Only while ``drained``: input already waiting would announce no new edge. ``handler``
        reads with ``receive_nowait`` and answers with ``send_nowait``; it returns True to sleep
        on, False to wake this task. An error it raises (any ``BaseException``) is raised here.
        It follows the handler contract of ``mailstorm._net.readiness``.
        """
        readiness = self._readiness
        assert readiness is not None and not readiness.readable, "wait_inline needs drained"
        self._unyielded = 0
        await readiness.wait_readable(handler)

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """One receive that never waits: None when nothing is there yet.

        With a hub, what the receive proved goes to ``Readiness.after_read``: a receive that
        found the socket empty (nothing, or less than asked for) makes it ``drained``, and the
        next arrival is a new edge, seen by the hub; a full one leaves the state as it was.
        """
        readiness = self._readiness
        try:
            data = self._sock.recv(max_bytes)
        except BlockingIOError:
            if readiness is not None:
                readiness.after_read(None, max_bytes)
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        if readiness is not None:
            readiness.after_read(len(data), max_bytes)
        return data

    def send_nowait(self, data: bytes) -> int:
        """Send what fits in the socket buffer now; the count sent (the rest is the caller's)."""
        self._just_sent = True
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def _wait_writable(self) -> None:
        readiness = self._readiness
        if readiness is None:
            await trio.lowlevel.wait_writable(self._sock)
        else:
            await readiness.wait_writable()  # only after a send fell short: see send_all

    def close(self) -> None:
        """Close now, without the checkpoint ``aclose`` owes (for callers already done)."""
        sock = self._sock
        fd = sock.fileno()
        if fd != -1:
            if self._hub is not None:
                self._hub.forget(fd)
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
