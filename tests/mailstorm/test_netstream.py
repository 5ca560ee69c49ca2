"""SocketTransport over real loopback TCP, with trio's waits and with the edge-triggered hub.

The hub's rules are the risky part (an edge seen while nobody waits must not be lost; a reader
parks only after the kernel said "nothing there"), so every transport test runs both ways; the
hub's own tests are skipped where it is off (no epoll, or ``MAILSTORM_NO_HUB=1``).
"""

from __future__ import annotations

import itertools
import select
import signal
import socket
from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from mailstorm._net.netstream import FAIRNESS_STEPS, RECEIVE_SIZE, SocketTransport
from mailstorm._net.readiness import (
    EVENTS_PER_TURN,
    NO_HUB_ENV,
    ReadinessHub,
    hub_enabled,
    open_readiness_hub,
)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


#: The hub's own tests, and the hub's half of the transport tests, need it on.
needs_hub = pytest.mark.skipif(
    not hub_enabled(), reason="the readiness hub is off (no epoll, or MAILSTORM_NO_HUB)"
)


@pytest.fixture
async def running_hub() -> AsyncIterator[ReadinessHub]:
    """A hub whose task runs for the length of the test."""
    async with open_readiness_hub() as hub:
        assert hub is not None, "tests that use running_hub are marked needs_hub"
        yield hub


@pytest.fixture(params=[pytest.param("hub", marks=needs_hub), "trio"])
async def hub(request: pytest.FixtureRequest) -> AsyncIterator[ReadinessHub | None]:
    """Each transport test runs on the hub (where it is on), and on trio's own waits."""
    if request.param == "trio":
        yield None
        return
    async with open_readiness_hub() as running:
        yield running


async def test_request_response_when_the_answer_is_already_there(hub: ReadinessHub | None) -> None:
    # The peer answers before the transport starts to wait: with an edge-triggered set the
    # arrival was reported while nobody waited, and must still wake the next read.
    mine, peer = _tcp_pair()
    transport = SocketTransport(mine, hub)
    with trio.fail_after(10):
        for i in range(200):
            await transport.send_all(b"ping %d\r\n" % i)
            assert peer.recv(100) == b"ping %d\r\n" % i
            peer.sendall(b"pong %d\r\n" % i)
            assert await transport.receive_some() == b"pong %d\r\n" % i
    transport.close()
    peer.close()


async def test_request_response_when_the_answer_comes_later(hub: ReadinessHub | None) -> None:
    mine, peer = _tcp_pair()
    peer.setblocking(False)
    transport = SocketTransport(mine, hub)

    async def answer_each() -> None:
        for _ in range(200):
            await trio.lowlevel.wait_readable(peer)
            line = peer.recv(100)
            await trio.sleep(0)
            peer.sendall(line.replace(b"ping", b"pong"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_each)
            for i in range(200):
                await transport.send_all(b"ping %d\r\n" % i)
                assert await transport.receive_some() == b"pong %d\r\n" % i
    transport.close()
    peer.close()


async def test_large_stream_in_both_directions(hub: ReadinessHub | None) -> None:
    # 8 MiB each way, far over the socket buffers: reads drain and park, writes fall short
    # and park, many times over.
    mine, peer = _tcp_pair()
    peer_transport = SocketTransport(peer, hub)
    transport = SocketTransport(mine, hub)
    blob = bytes(range(256)) * (8 * 4096)

    async def pump(src: SocketTransport, dst: SocketTransport, into: bytearray) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(src.send_all, blob)
            while len(into) < len(blob):
                into += await dst.receive_some(RECEIVE_SIZE)

    one, other = bytearray(), bytearray()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, transport, peer_transport, one)
            nursery.start_soon(pump, peer_transport, transport, other)
    assert one == blob and other == blob
    transport.close()
    peer_transport.close()


async def test_end_of_stream(hub: ReadinessHub | None) -> None:
    mine, peer = _tcp_pair()
    transport = SocketTransport(mine, hub)
    await transport.send_all(b"bye\r\n")
    assert peer.recv(100) == b"bye\r\n"  # unread data would make close() a reset
    peer.sendall(b"last words")
    peer.close()
    with trio.fail_after(10):
        received = b""
        while chunk := await transport.receive_some():
            received += chunk
    assert received == b"last words"
    transport.close()


async def test_cancelled_wait_leaves_the_transport_usable(hub: ReadinessHub | None) -> None:
    mine, peer = _tcp_pair()
    transport = SocketTransport(mine, hub)
    await transport.send_all(b"hello\r\n")
    with trio.move_on_after(0.05) as scope:
        await transport.receive_some()
    assert scope.cancelled_caught
    peer.sendall(b"late answer")
    with trio.fail_after(10):
        assert await transport.receive_some() == b"late answer"
    transport.close()
    peer.close()


@needs_hub
async def test_close_wakes_a_waiting_reader(running_hub: ReadinessHub) -> None:
    mine, peer = _tcp_pair()
    transport = SocketTransport(mine, running_hub)
    await transport.send_all(b"hello\r\n")
    outcome: list[type[BaseException]] = []

    async def reader() -> None:
        try:
            await transport.receive_some()
        except trio.ClosedResourceError as exc:
            outcome.append(type(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        transport.close()
    assert outcome == [trio.ClosedResourceError]
    assert len(running_hub) == 0
    peer.close()


@needs_hub
async def test_two_readers_is_a_usage_error(running_hub: ReadinessHub) -> None:
    mine, peer = _tcp_pair()
    transport = SocketTransport(mine, running_hub)
    await transport.send_all(b"hello\r\n")

    async def first_reader() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await transport.receive_some()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_reader)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await transport.receive_some()
        transport.close()
    peer.close()


async def test_data_and_end_of_stream_in_one_edge_after_a_send(hub: ReadinessHub | None) -> None:
    # The peer's last data and its FIN arrive before anybody looks: the hub sees them as one
    # edge. A short read returns the data, and the read after the reply must still see the end
    # of the stream rather than park for an edge that will never come.
    mine, peer = _tcp_pair()
    transport = SocketTransport(mine, hub)
    with trio.fail_after(10):
        await transport.send_all(b"banner\r\n")
        peer.sendall(b"QUIT\r\n")
        peer.shutdown(socket.SHUT_WR)
        await trio.testing.wait_all_tasks_blocked()
        assert await transport.receive_some() == b"QUIT\r\n"
        await transport.send_all(b"221 bye\r\n")
        assert await transport.receive_some() == b""
    transport.close()
    peer.close()


async def test_connect_then_talk(hub: ReadinessHub | None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        transport = SocketTransport(socket.socket(), hub)
        with trio.fail_after(10):
            await transport.connect(listener.getsockname())
            peer, _ = listener.accept()
            peer.sendall(b"220 hello\r\n")
            assert await transport.receive_some() == b"220 hello\r\n"
            await transport.send_all(b"QUIT\r\n")
            assert peer.recv(100) == b"QUIT\r\n"
    transport.close()
    peer.close()


async def test_connect_refused_is_an_oserror(hub: ReadinessHub | None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = listener.getsockname()  # closed at once: nobody listens there any more
    transport = SocketTransport(socket.socket(), hub)
    with trio.fail_after(10), pytest.raises(ConnectionRefusedError):
        await transport.connect(address)
    transport.close()


# ---- the inline mode: a handler run on the hub's turn ----------------------------------------


class EchoHandler:
    """An inline handler that answers each arrival in upper case, until it reads b"stop"."""

    def __init__(self, transport: SocketTransport) -> None:
        self.transport = transport
        self.calls = 0
        self.fail = False

    def __call__(self) -> bool:
        self.calls += 1
        if self.fail:
            raise ValueError("handler failed")
        data = self.transport.receive_nowait(RECEIVE_SIZE)
        if data is None:
            return True
        if data == b"stop":
            return False
        self.transport.send_nowait(data.upper())
        return True


def _drained_pair(hub: ReadinessHub) -> tuple[SocketTransport, socket.socket]:
    """A transport that has found its socket empty (as ``wait_inline`` requires), and its peer."""
    mine, peer = _tcp_pair()
    peer.settimeout(10)  # the peer's recv runs in a thread: a failure must not hang the test
    transport = SocketTransport(mine, hub)
    assert transport.receive_nowait(RECEIVE_SIZE) is None
    assert transport.drained
    return transport, peer


@needs_hub
async def test_inline_handler_answers_without_waking_the_task(running_hub: ReadinessHub) -> None:
    transport, peer = _drained_pair(running_hub)
    handler = EchoHandler(transport)
    woke = trio.Event()

    async def wait() -> None:
        await transport.wait_inline(handler)
        woke.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()  # parked before anything arrives
            for i in range(50):
                peer.sendall(b"ping %d" % i)
                assert await trio.to_thread.run_sync(peer.recv, 100) == b"PING %d" % i
                assert not woke.is_set()
            peer.sendall(b"stop")
    assert woke.is_set()
    assert handler.calls == 51
    transport.close()
    peer.close()


@needs_hub
async def test_inline_handler_error_is_raised_in_the_waiting_task(
    running_hub: ReadinessHub,
) -> None:
    transport, peer = _drained_pair(running_hub)
    handler = EchoHandler(transport)
    raised: list[BaseException] = []

    async def wait() -> None:
        try:
            await transport.wait_inline(handler)
        except ValueError as exc:
            raised.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            peer.sendall(b"first")
            assert await trio.to_thread.run_sync(peer.recv, 100) == b"FIRST"
            handler.fail = True
            peer.sendall(b"second")
    assert [str(exc) for exc in raised] == ["handler failed"]
    transport.close()
    peer.close()


@needs_hub
async def test_cancelled_inline_wait_disarms_the_handler(running_hub: ReadinessHub) -> None:
    transport, peer = _drained_pair(running_hub)
    handler = EchoHandler(transport)
    with trio.move_on_after(0.05):
        await transport.wait_inline(handler)
    peer.sendall(b"after")
    await trio.testing.wait_all_tasks_blocked()  # the hub has seen the arrival by now
    assert handler.calls == 0  # nobody waits any more: the arrival is only remembered
    assert not transport.drained
    with trio.fail_after(10):
        assert await transport.receive_some() == b"after"
    transport.close()
    peer.close()


@needs_hub
async def test_closing_the_socket_ends_an_inline_wait(running_hub: ReadinessHub) -> None:
    transport, peer = _drained_pair(running_hub)
    handler = EchoHandler(transport)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await transport.wait_inline(handler)

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            transport.close()
    assert handler.calls == 0
    peer.close()


# ---- where a handler's errors go (the handler contract in mailstorm._net.readiness) ------------


async def _wait_inline_for(
    hub: ReadinessHub, handler_for: Callable[[SocketTransport], Callable[[], bool]]
) -> BaseException | None:
    """Park a task inline with ``handler_for(transport)``, make one arrival, and return what
    the task's wait raised (None: it returned)."""
    transport, peer = _drained_pair(hub)
    raised: list[BaseException | None] = []

    async def wait() -> None:
        try:
            await transport.wait_inline(handler_for(transport))
        except BaseException as exc:  # what the hub woke the task with, whatever it is
            raised.append(exc)
        else:
            raised.append(None)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            peer.sendall(b"x")
    transport.close()
    peer.close()
    return raised[0]


async def _hub_still_serves(hub: ReadinessHub) -> None:
    """Another session's inline wait still works on ``hub``."""
    transport, peer = _drained_pair(hub)
    handler = EchoHandler(transport)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.wait_inline, handler)
            await trio.testing.wait_all_tasks_blocked()
            peer.sendall(b"ping")
            assert await trio.to_thread.run_sync(peer.recv, 100) == b"PING"
            peer.sendall(b"stop")
    transport.close()
    peer.close()


@needs_hub
def test_a_base_exception_in_a_handler_goes_to_its_task_and_the_hub_runs_on() -> None:
    # Before: only Exception went to the task; a KeyboardInterrupt (or any BaseException)
    # raised by one session's handler ended the hub, and with it every session. A run of its
    # own, so that a regression fails this test rather than interrupting pytest.
    def handler_for(transport: SocketTransport) -> Callable[[], bool]:
        def handler() -> bool:
            transport.receive_nowait(RECEIVE_SIZE)
            raise KeyboardInterrupt

        return handler

    async def main() -> BaseException | None:
        async with open_readiness_hub() as hub:
            assert hub is not None
            raised = await _wait_inline_for(hub, handler_for)
            await _hub_still_serves(hub)
            return raised

    try:
        raised = trio.run(main)
    except BaseException as exc:  # the hub let it out: every session would have ended
        pytest.fail(f"a handler's error escaped the hub: {exc!r}")
    assert isinstance(raised, KeyboardInterrupt)


@needs_hub
async def test_an_error_after_the_handler_closed_its_socket_reaches_the_task(
    running_hub: ReadinessHub,
) -> None:
    # Before: the close woke the task with ClosedResourceError and the error was dropped.
    def handler_for(transport: SocketTransport) -> Callable[[], bool]:
        def handler() -> bool:
            transport.close()
            raise ValueError("failed after close")

        return handler

    raised = await _wait_inline_for(running_hub, handler_for)
    assert isinstance(raised, ValueError) and str(raised) == "failed after close"
    await _hub_still_serves(running_hub)


@needs_hub
async def test_a_handler_that_closes_its_socket_wakes_the_task_with_closed(
    running_hub: ReadinessHub,
) -> None:
    def handler_for(transport: SocketTransport) -> Callable[[], bool]:
        def handler() -> bool:
            transport.close()
            return True  # "sleep on" means nothing on a closed socket

        return handler

    assert isinstance(await _wait_inline_for(running_hub, handler_for), trio.ClosedResourceError)
    assert len(running_hub) == 0


@needs_hub
async def test_a_handler_that_cancels_its_own_task_wakes_it_once(
    running_hub: ReadinessHub,
) -> None:
    # The abort cannot happen while the hub runs the handler: the task wakes when it returns,
    # and the cancellation arrives at its next checkpoint.
    transport, peer = _drained_pair(running_hub)
    seen: list[str] = []

    async def wait() -> None:
        with trio.CancelScope() as scope:

            def handler() -> bool:
                transport.receive_nowait(RECEIVE_SIZE)
                scope.cancel()
                return True

            await transport.wait_inline(handler)
            seen.append("woken")
            await trio.lowlevel.checkpoint()
            seen.append("not cancelled")
        seen.append("cancelled" if scope.cancelled_caught else "?")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            peer.sendall(b"x")
    assert seen == ["woken", "cancelled"]
    await _hub_still_serves(running_hub)
    transport.close()
    peer.close()


@needs_hub
def test_ctrl_c_during_a_handler_reaches_the_main_task() -> None:
    # The hub's task is protected from KeyboardInterrupt: a Ctrl-C that lands while a handler
    # runs lets it finish, and trio raises it in the main task, not in some session.
    events: list[str] = []

    async def main() -> None:
        async with open_readiness_hub() as hub:
            assert hub is not None
            transport, peer = _drained_pair(hub)

            def handler() -> bool:
                signal.raise_signal(signal.SIGINT)
                events.append("handler finished")
                return True

            async def session() -> None:
                try:
                    await transport.wait_inline(handler)
                except KeyboardInterrupt:
                    events.append("the session got it")

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session)
                    await trio.testing.wait_all_tasks_blocked()
                    peer.sendall(b"x")
                    await trio.sleep(10)  # Ctrl-C ends this wait (the bound: no hang)
            finally:
                transport.close()
                peer.close()

    with pytest.raises(BaseException) as raised:  # which one: checked just below
        trio.run(main)
    interrupts, _ = BaseExceptionGroup("run", [raised.value]).split(KeyboardInterrupt)
    assert interrupts is not None, raised.value
    assert events == ["handler finished"]


# ---- bounded turns: the hub's batches, the transport's fast paths ----------------------------


class StepLog(trio.abc.Instrument):
    """Per task step: which task ran and how many counted operations it did; "<io>" marks
    each pass of the scheduler through its I/O wait (between batches of steps)."""

    def __init__(self) -> None:
        self.count = 0
        self.steps: list[tuple[str, int]] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.count = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps.append((task.name, self.count))

    def before_io_wait(self, timeout: float) -> None:
        self.steps.append(("<io>", 0))


@needs_hub
async def test_a_burst_on_many_sessions_runs_in_bounded_hub_steps(
    running_hub: ReadinessHub,
) -> None:
    # Every parked session gets data in one go; the hub may run at most EVENTS_PER_TURN
    # handlers per step of its task, and passes through the scheduler between batches, so
    # that another task (here an always-ready stand-in for the accept loop) runs meanwhile.
    sessions = 3 * EVENTS_PER_TURN + 10
    log = StepLog()
    done = trio.Event()
    handled = 0
    pairs = [_drained_pair(running_hub) for _ in range(sessions)]

    def handler_for(transport: SocketTransport) -> Callable[[], bool]:
        def handler() -> bool:
            nonlocal handled
            log.count += 1
            handled += 1
            if handled == sessions:
                done.set()
            transport.receive_nowait(RECEIVE_SIZE)
            return True

        return handler

    async def stand_in() -> None:
        while not done.is_set():
            await trio.lowlevel.checkpoint()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for transport, _ in pairs:
                nursery.start_soon(transport.wait_inline, handler_for(transport))
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(log)
            try:
                for _, peer in pairs:
                    peer.send(b"x")  # all in one step of this task: one burst
                nursery.start_soon(stand_in, name="stand_in")
                await done.wait()
            finally:
                trio.lowlevel.remove_instrument(log)
            nursery.cancel_scope.cancel()
    for transport, peer in pairs:
        transport.close()
        peer.close()
    hub_steps = [i for i, (name, count) in enumerate(log.steps) if count and "Hub" in name]
    runs = [log.steps[i][1] for i in hub_steps]
    assert sum(runs) == sessions
    assert max(runs) <= EVENTS_PER_TURN, runs
    assert len(hub_steps) >= -(-sessions // EVENTS_PER_TURN)
    for first, second in itertools.pairwise(hub_steps):
        assert ("<io>", 0) in log.steps[first:second]  # each batch in a scheduler pass of its own
    # The stand-in runs once per pass; between the first and the last batch it ran at least
    # once for each pass strictly between them (trio may order a pass's steps either way).
    window = log.steps[hub_steps[0] : hub_steps[-1]]
    assert sum(1 for name, _ in window if name == "stand_in") >= len(hub_steps) - 2


class OwnSteps(trio.abc.Instrument):
    """The most counted operations one task did in one of its steps (without yielding)."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.count = 0
        self.most = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.count = 0

    def add(self) -> None:
        self.count += 1
        self.most = max(self.most, self.count)


async def test_sends_that_fit_yield_at_a_bounded_interval(hub: ReadinessHub | None) -> None:
    # Before: a send that fit the socket buffer never yielded, however many came in a row.
    mine, peer = _tcp_pair()
    transport = SocketTransport(mine, hub)
    steps = OwnSteps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        for _ in range(10 * FAIRNESS_STEPS):
            await transport.send_all(b"x")
            steps.add()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert steps.most <= FAIRNESS_STEPS, steps.most
    transport.close()
    peer.close()


async def test_answers_already_waiting_yield_at_a_bounded_interval(
    hub: ReadinessHub | None,
) -> None:
    # A peer far ahead: every answer is there before its question is sent. Before: with the
    # hub, a read after a send reset the read counter and the send never yielded, so such a
    # session never let another task run.
    rounds = 10 * FAIRNESS_STEPS
    mine, peer = _tcp_pair()
    transport = SocketTransport(mine, hub)
    peer.sendall(b"pong\r\n" * rounds)
    await trio.testing.wait_all_tasks_blocked()  # the hub has seen the arrival
    steps = OwnSteps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        with trio.fail_after(10):
            for _ in range(rounds):
                await transport.send_all(b"ping\r\n")
                steps.add()
                assert await transport.receive_some(6) == b"pong\r\n"
                steps.add()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert steps.most <= FAIRNESS_STEPS, steps.most
    transport.close()
    peer.close()


# ---- the hub's lifetime and the switch ----------------------------------------------------------


@needs_hub
async def test_the_hub_task_lives_in_the_context_managers_nursery() -> None:
    me = trio.lowlevel.current_task()
    before = list(me.child_nurseries)
    async with open_readiness_hub() as hub:
        assert hub is not None
        [mine] = [nursery for nursery in me.child_nurseries if nursery not in before]
        assert [task.name for task in mine.child_tasks] == [
            "mailstorm._net.readiness.ReadinessHub.run"
        ]
    assert me.child_nurseries == before


async def test_mailstorm_no_hub_switches_the_hub_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NO_HUB_ENV, "1")
    assert not hub_enabled()
    async with open_readiness_hub() as hub:
        assert hub is None
    monkeypatch.setenv(NO_HUB_ENV, "0")
    assert hub_enabled() == hasattr(select, "epoll")
