"""Socket readiness for many connections from one edge-triggered epoll set, inside trio.

Why: trio registers a socket with its epoll in one-shot mode, so every wait for input costs an
``epoll_ctl`` system call to re-arm it plus the bookkeeping around it (a waiter object made and
dropped). A request/response SMTP session waits four times per message; on the sink's hot path
that was 15-20% of the CPU. Here each socket is registered once, edge-triggered, in an epoll set
of our own; one task (``ReadinessHub.run``) waits for that set with an ordinary trio wait and
wakes the tasks whose sockets became ready. A wait is then a flag test and a park.

Edge-triggered rules, which ``SocketTransport`` follows: a socket reports readable once per
arrival of data, so a reader may only park after the kernel said "nothing there" (EAGAIN or a
short read); ``Readiness.readable`` remembers an arrival seen while nobody was waiting. The
peer's last data and its end of stream can come as one edge, so after a hang-up a short read
is no proof of "nothing there": ``Readiness.hangup`` keeps the socket readable for good. A
writer parks only after a send fell short, and the kernel reports space again after that.
Spurious wake-ups are harmless: the transport retries the system call and parks again.

Inline waits: a trio task switch costs more than answering one SMTP command, so a reader may
wait with a handler instead (``Readiness.wait_readable(inline)``). On each readable edge the
hub calls that handler in its own turn; it reads, feeds its sans-IO connection and writes
without blocking, and says whether the waiting task should wake. The task keeps everything else: the
handler's errors are raised in it, its cancel scope ends the wait (which disarms the handler),
and whatever must wait (a store, a handshake, a full send buffer) is done by it once woken. A
handler does at most one read per edge, so a turn of the hub stays short.

Resource handling: the hub's task lives in a nursery that encloses the tasks using its
sockets (in the sink, one around the sessions' nursery; in the load generator, the run's outer
nursery), so it outlives every socket registered with it. ``forget`` is called before a
socket is closed and wakes any task still waiting on it with ``trio.ClosedResourceError``. On
platforms without epoll there is no hub, and ``SocketTransport`` waits through trio as usual.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import outcome
import trio

__all__ = ["Readiness", "ReadinessHub"]

#: Events taken from the epoll set per system call.
MAX_EVENTS = 1024
_HAS_EPOLL = hasattr(select, "epoll")
_READ_EVENTS = (
    (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR) if _HAS_EPOLL else 0
)
#: The peer closed or the connection failed: from then on a read never blocks.
_HANGUP_EVENTS = (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR) if _HAS_EPOLL else 0
_WRITE_EVENTS = (select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR) if _HAS_EPOLL else 0
_REGISTER_MASK = (
    (select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET) if _HAS_EPOLL else 0
)


class Readiness:
    """One socket's state in the hub: what arrived unobserved, and who waits.

    The waits live here rather than on the hub so that a transport's wait is one call deep:
    it runs on every request/response turn of every session.
    """

    __slots__ = ("hangup", "inline", "read_task", "readable", "write_task")

    def __init__(self) -> None:
        #: Data arrived (or the peer closed) since a reader last found the socket drained.
        self.readable = True
        #: The peer closed (or the connection failed): reads never block again, so a reader
        #: that found the socket drained sets ``readable`` to this rather than to False.
        self.hangup = False
        self.read_task: trio.lowlevel.Task | None = None
        self.write_task: trio.lowlevel.Task | None = None
        #: The handler ``read_task`` waits with, run on the hub's turn (None: just wake it).
        self.inline: Callable[[], bool] | None = None

    # Not coroutines themselves: each returns trio's own wait to be awaited, one frame less on
    # every wake-up of every session.

    def wait_readable(
        self, inline: Callable[[], bool] | None = None
    ) -> Coroutine[Any, Any, object]:
        """Sleep (when awaited) until the hub sees this socket's next readable edge.

        With ``inline``, sleep on while that handler deals with each readable edge by itself:
        the hub calls it in its own turn and wakes the task only when it returns False (or
        raises: the task then gets the error). It must not block: it is synchronous code run
        for the waiting task.
        """
        if self.read_task is not None:
            raise trio.BusyResourceError("another task is already reading this socket")
        self.read_task = trio.lowlevel.current_task()
        self.inline = inline
        return trio.lowlevel.wait_task_rescheduled(self._abort_read)

    def wait_writable(self) -> Coroutine[Any, Any, object]:
        """Sleep (when awaited) until the hub sees this socket's next writable edge (after a
        short send)."""
        if self.write_task is not None:
            raise trio.BusyResourceError("another task is already writing this socket")
        self.write_task = trio.lowlevel.current_task()
        return trio.lowlevel.wait_task_rescheduled(self._abort_write)

    def _abort_read(self, _: object) -> trio.lowlevel.Abort:
        self.read_task = None
        self.inline = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _abort_write(self, _: object) -> trio.lowlevel.Abort:
        self.write_task = None
        return trio.lowlevel.Abort.SUCCEEDED


def _run_inline(entry: Readiness, task: trio.lowlevel.Task) -> None:
    """Give a readable edge to the waiting task's inline handler; wake the task if it asks."""
    handler = entry.inline
    assert handler is not None
    try:
        if handler():
            return  # handled: the task sleeps on, the handler stays armed
        result: outcome.Outcome[object] = outcome.Value(None)
    except Exception as exc:  # the task's own code failed: the task gets the error
        result = outcome.Error(exc)
    if entry.read_task is task:  # a handler that closed its socket woke the task (forget)
        entry.read_task = None
        entry.inline = None
        trio.lowlevel.reschedule(task, result)


class ReadinessHub:
    """An edge-triggered epoll set and the task that turns its events into wake-ups."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._sockets: dict[int, Readiness] = {}

    @classmethod
    def create(cls) -> ReadinessHub | None:
        """A hub, or None where epoll does not exist (the transport then uses trio's waits)."""
        return cls() if _HAS_EPOLL else None

    def __len__(self) -> int:
        return len(self._sockets)

    def register(self, sock: socket.socket) -> Readiness:
        fd = sock.fileno()
        entry = Readiness()
        self._epoll.register(fd, _REGISTER_MASK)
        self._sockets[fd] = entry
        return entry

    def forget(self, fd: int) -> None:
        """Drop a socket before it is closed; whoever still waits on it gets ClosedResourceError."""
        entry = self._sockets.pop(fd, None)
        if entry is None:
            return
        # Closing the socket would drop it from the set too; unregistering first keeps a
        # reused descriptor number from inheriting anything. The set itself may be closed
        # already when a session is aborted after the hub stopped (ValueError).
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        for task in (entry.read_task, entry.write_task):
            if task is not None:
                trio.lowlevel.reschedule(
                    task, outcome.Error(trio.ClosedResourceError("socket was closed"))
                )
        entry.read_task = entry.write_task = None
        entry.inline = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake waiting tasks as their sockets become ready; runs until cancelled."""
        epoll = self._epoll
        sockets = self._sockets
        reschedule = trio.lowlevel.reschedule
        wait_readable = trio.lowlevel.wait_readable
        fd = epoll.fileno()
        task_status.started()
        try:
            while True:
                await wait_readable(fd)
                for sock_fd, flags in epoll.poll(0, MAX_EVENTS):
                    entry = sockets.get(sock_fd)
                    if entry is None:
                        continue
                    if flags & _READ_EVENTS:
                        if flags & _HANGUP_EVENTS:
                            entry.hangup = True
                        task = entry.read_task
                        if task is None:
                            entry.readable = True
                        elif entry.inline is None:
                            entry.read_task = None
                            reschedule(task)
                        else:
                            entry.readable = True
                            _run_inline(entry, task)
                    if flags & _WRITE_EVENTS:
                        task = entry.write_task
                        if task is not None:
                            entry.write_task = None
                            reschedule(task)
        finally:
            trio.lowlevel.notify_closing(fd)
            epoll.close()
