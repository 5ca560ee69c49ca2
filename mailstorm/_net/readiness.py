"""Socket readiness for many connections from one edge-triggered epoll set, inside trio.

Owns: the edge-triggered readiness state of each registered socket (``Readiness``), the hub
task that turns the set's events into wake-ups and inline-handler runs (``ReadinessHub.run``),
and the one place that starts it (``open_readiness_hub``). It never reads or writes a socket
itself, never parses anything, and never decides for a session: handlers do the I/O.

Why: trio registers a socket with its epoll in one-shot mode, so every wait for input costs an
``epoll_ctl`` system call to re-arm it plus the bookkeeping around it (a waiter object made and
dropped). A request/response SMTP session waits four times per message; on the sink's hot path
that was 15-20% of the CPU. Here each socket is registered once, edge-triggered, in an epoll set
of our own; one task (``ReadinessHub.run``) waits for that set with an ordinary trio wait and
wakes the tasks whose sockets became ready. A wait is then a flag test and a park.

The invariant (read side). An edge-triggered set reports a socket once per arrival of data
(or of the peer's FIN or an error) after the hub last took its events; it says nothing about
data that is merely still there. So::

    not readable  =>  the socket is empty, or an edge is still to come for what is in it

and a reader may park exactly when ``readable`` is False: whatever it would miss announces
itself. The transitions that keep it, and nothing else, change the flags:

- ``Readiness.on_edge(flags)``: every readable edge, whoever waits and however it is served,
  sets ``readable`` (and ``hangup`` when the peer closed or the connection failed). Waking a
  reader without marking the socket readable lost a wake-up (issue 14: a full read then left
  data behind a flag that said "empty", and the session parked on it for good).
- ``Readiness.after_read(got, asked)``: only a read that proves the socket empty clears
  ``readable``: EAGAIN, or a short read (less than asked: TCP hands over all it has). A full
  read proves nothing and changes nothing. After a hang-up reads never block again and a
  short read is no proof (the last data and the FIN come as one edge), so ``readable`` stays
  True for good; an empty read (end of stream) counts as a hang-up.
- ``drained`` (the transport's ``not readable``) is what a reader tests before parking.

Spurious wake-ups are harmless (the transport retries the system call and parks again); a
lost one hangs a session, so every doubt resolves to ``readable = True``. The write side needs
no flag: a writer parks only after a send fell short, and the kernel reports space after that.
``tests/mailstorm/test_readiness_model.py`` checks the invariant against a model of the socket.

Inline waits: a trio task switch costs more than answering one SMTP command, so a reader may
wait with a handler instead (``Readiness.wait_readable(inline)``). On each readable edge the
hub calls that handler in its own turn; it reads, feeds its sans-IO connection and writes
without blocking, and returns True to let the task sleep on, False to wake it. The task keeps
everything else: its cancel scope ends the wait at any time (which disarms the handler), and
whatever must wait (a store, a handshake, a full send buffer) is done by it once woken.

The handler contract (the one statement of it; the shells' handlers point here). A handler:

- never blocks and never awaits: it is synchronous code run on the hub's turn, between other
  sessions' handlers;
- uses no context variables and nothing that asks trio for "the current task": that is the
  hub's task, not the session's (so it opens no cancel scope and sets no deadline; reading
  the clock with ``trio.current_time`` is fine);
- does at most one read per edge (``receive_nowait``) and wakes its task when that read did
  not drain the socket (``drained`` is False), so that one peer cannot hold the hub;
- may write (``send_nowait``), close its socket, and cancel existing scopes (its own task's
  included); the hub copes, as below.

Where errors go: anything a handler raises, ``BaseException`` included, is raised in the
waiting task (it was the task's code that failed, and the hub serves every other session);
the hub runs on. If the handler also closed its socket (``forget``) or cancelled its own task,
the hub still wakes the task once, with the handler's error first, else
``trio.ClosedResourceError`` after a close, else normally (a cancellation then arrives at the
task's next checkpoint, as trio does for an abort that cannot happen at once). Ctrl-C never
lands inside a handler: the hub task is protected from KeyboardInterrupt (trio delivers it to
the main task instead). Errors of the hub's own code end the hub, and with it its nursery.

Bounded turns: the hub takes at most ``EVENTS_PER_TURN`` events per step and yields to the
scheduler between batches, so a burst on many sessions (each handler up to a 64 KiB read and
its replies) cannot keep the accept loop, the stores and the timers waiting behind it.

Lifetime and the switch: ``open_readiness_hub()`` yields a hub whose task lives in a nursery
the context manager owns; it must enclose every task that uses the hub's sockets (in the sink,
the sessions' nursery; in the load generator, the run's). ``forget`` is called before a socket
is closed and wakes any task still waiting on it with ``trio.ClosedResourceError``. Where there
is no epoll, or with the environment variable ``MAILSTORM_NO_HUB=1``, it yields None and
``SocketTransport`` waits through trio's own waits instead; the test suites run both ways.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import outcome
import trio

__all__ = [
    "EVENTS_PER_TURN",
    "NO_HUB_ENV",
    "Readiness",
    "ReadinessHub",
    "hub_enabled",
    "open_readiness_hub",
]

#: Events (so at most as many inline-handler runs) per step of the hub's task.
EVENTS_PER_TURN = 64
#: The environment variable that switches the hub off ("1"; "" or "0" leave it on).
NO_HUB_ENV = "MAILSTORM_NO_HUB"

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


def hub_enabled() -> bool:
    """Whether ``open_readiness_hub`` gives a hub: epoll exists and ``MAILSTORM_NO_HUB`` is
    unset, empty or "0". Read on every call, so a test may switch it."""
    return _HAS_EPOLL and os.environ.get(NO_HUB_ENV, "") in ("", "0")


@contextlib.asynccontextmanager
async def open_readiness_hub() -> AsyncIterator[ReadinessHub | None]:
    """A running hub for the body's sockets, or None (no epoll, or switched off).

    The hub's task lives in a nursery of this context manager, cancelled when the body ends:
    open it around the nursery of the tasks that use its sockets.
    """
    if not hub_enabled():
        yield None
        return
    hub = ReadinessHub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        yield hub
        nursery.cancel_scope.cancel()


def _closed_error() -> trio.ClosedResourceError:
    return trio.ClosedResourceError("socket was closed")


class Readiness:
    """One socket's state in the hub: what arrived unobserved, and who waits.

    The waits live here rather than on the hub so that a transport's wait is one call deep:
    it runs on every request/response turn of every session. The flags change only through
    ``on_edge`` and ``after_read`` (see the module docstring for the invariant they keep).
    """

    __slots__ = ("closed", "handling", "hangup", "inline", "read_task", "readable", "write_task")

    def __init__(self) -> None:
        #: Data arrived (or the peer closed) since a read last proved the socket empty.
        self.readable = True
        #: The peer closed (or the connection failed): reads never block again, so
        #: ``readable`` stays True for good.
        self.hangup = False
        self.read_task: trio.lowlevel.Task | None = None
        self.write_task: trio.lowlevel.Task | None = None
        #: The handler ``read_task`` waits with, run on the hub's turn (None: just wake it).
        self.inline: Callable[[], bool] | None = None
        #: The hub is running ``inline`` now: a close or an abort leaves the wake-up to it.
        self.handling = False
        #: ``forget`` dropped this socket from the hub.
        self.closed = False

    # ---- the state transitions ------------------------------------------------------------

    def on_edge(self, flags: int) -> None:
        """A readable edge (epoll ``flags``): the socket holds something to read."""
        self.readable = True
        if flags & _HANGUP_EVENTS:
            self.hangup = True

    def after_read(self, got: int | None, asked: int) -> None:
        """A receive of ``asked`` bytes returned ``got`` of them (None: EAGAIN)."""
        if got is None or got < asked:  # the socket was empty when the read ended
            if got == 0:
                self.hangup = True  # end of stream: reads never block again
            self.readable = self.hangup

    # ---- the waits --------------------------------------------------------------------------
    # Not coroutines themselves: each returns trio's own wait to be awaited, one frame less on
    # every wake-up of every session.

    def wait_readable(
        self, inline: Callable[[], bool] | None = None
    ) -> Coroutine[Any, Any, object]:
        """Sleep (when awaited) until the hub sees this socket's next readable edge.

        Only after a read proved the socket empty (``readable`` False), or the wake-up may
        never come. With ``inline``, sleep on while that handler deals with each readable edge
        by itself (see the handler contract in the module docstring): the task wakes when it
        returns False, and gets the error when it raises.
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
        if self.handling:
            # The task's own handler cancelled it: the hub wakes the task when the handler
            # returns, and trio raises the cancellation at the task's next checkpoint.
            self.inline = None
            return trio.lowlevel.Abort.FAILED
        self.read_task = None
        self.inline = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _abort_write(self, _: object) -> trio.lowlevel.Abort:
        self.write_task = None
        return trio.lowlevel.Abort.SUCCEEDED


def _run_inline(entry: Readiness, task: trio.lowlevel.Task) -> None:
    """Give a readable edge to the waiting task's inline handler; wake the task if it asks,
    if it raised, or if the socket was closed or the task cancelled meanwhile."""
    handler = entry.inline
    assert handler is not None
    entry.handling = True
    result: outcome.Outcome[object]
    try:
        sleep_on = handler()
    except BaseException as exc:  # the task's own code failed: the task gets the error
        result = outcome.Error(exc)
    else:
        if sleep_on and entry.inline is handler:  # nobody closed or cancelled meanwhile
            entry.handling = False
            return
        result = outcome.Error(_closed_error()) if entry.closed else outcome.Value(None)
    entry.handling = False
    entry.read_task = None
    entry.inline = None
    trio.lowlevel.reschedule(task, result)


class ReadinessHub:
    """An edge-triggered epoll set and the task that turns its events into wake-ups.

    Made and run by ``open_readiness_hub``; tests that drive a hub by hand make one directly.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._sockets: dict[int, Readiness] = {}

    def __len__(self) -> int:
        return len(self._sockets)

    def register(self, sock: socket.socket) -> Readiness:
        fd = sock.fileno()
        entry = Readiness()
        self._epoll.register(fd, _REGISTER_MASK)
        self._sockets[fd] = entry
        return entry

    def forget(self, fd: int) -> None:
        """Drop a socket before it is closed; whoever still waits on it gets ClosedResourceError
        (a task whose handler is running now gets it, or the handler's error, from the hub)."""
        entry = self._sockets.pop(fd, None)
        if entry is None:
            return
        entry.closed = True
        # Closing the socket would drop it from the set too; unregistering first keeps a
        # reused descriptor number from inheriting anything. The set itself may be closed
        # already when a session is aborted after the hub stopped (ValueError).
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        task = entry.write_task
        if task is not None:
            entry.write_task = None
            trio.lowlevel.reschedule(task, outcome.Error(_closed_error()))
        if entry.handling:
            entry.inline = None  # _run_inline wakes the reader when its handler returns
            return
        task = entry.read_task
        if task is not None:
            entry.read_task = None
            entry.inline = None
            trio.lowlevel.reschedule(task, outcome.Error(_closed_error()))

    @trio.lowlevel.enable_ki_protection
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake waiting tasks as their sockets become ready; runs until cancelled.

        Protected from KeyboardInterrupt, so that Ctrl-C never interrupts a handler halfway
        (trio raises it in the main task instead).
        """
        epoll = self._epoll
        sockets = self._sockets
        reschedule = trio.lowlevel.reschedule
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        fd = epoll.fileno()
        task_status.started()
        try:
            while True:
                await wait_readable(fd)
                while True:
                    events = epoll.poll(0, EVENTS_PER_TURN)
                    for sock_fd, flags in events:
                        entry = sockets.get(sock_fd)
                        if entry is None:
                            continue
                        if flags & _READ_EVENTS:
                            entry.on_edge(flags)  # first, whoever waits: see the invariant
                            task = entry.read_task
                            if task is not None:
                                if entry.inline is None:
                                    entry.read_task = None
                                    reschedule(task)
                                else:
                                    _run_inline(entry, task)
                        if flags & _WRITE_EVENTS:
                            task = entry.write_task
                            if task is not None:
                                entry.write_task = None
                                reschedule(task)
                    if len(events) < EVENTS_PER_TURN:
                        break  # the set is empty: wait for it
                    await checkpoint()  # a full batch: the others run before the next one
        finally:
            trio.lowlevel.notify_closing(fd)
            epoll.close()
