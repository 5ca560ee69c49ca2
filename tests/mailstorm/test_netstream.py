"""SocketTransport over real loopback TCP, with trio's waits and with the edge-triggered hub.

The hub's rules are the risky part (an edge seen while nobody waits must not be lost; a reader
parks only after the kernel said "nothing there"), so every test runs both ways.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from mailstorm._net.netstream import RECEIVE_SIZE, SocketTransport
from mailstorm._net.readiness import ReadinessHub

pytestmark = pytest.mark.skipif(ReadinessHub.create() is None, reason="needs epoll")


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


@pytest.fixture
async def running_hub() -> AsyncIterator[ReadinessHub]:
    """A hub whose task runs for the length of the test."""
    hub = ReadinessHub.create()
    assert hub is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        yield hub
        nursery.cancel_scope.cancel()


@pytest.fixture(params=["hub", "trio"])
async def hub(
    request: pytest.FixtureRequest, running_hub: ReadinessHub
) -> ReadinessHub | None:
    """Each transport test runs on the hub, and on trio's own waits."""
    return running_hub if request.param == "hub" else None


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
