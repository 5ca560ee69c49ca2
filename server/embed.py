"""The sink inside another program or a test: ``open_sink`` for trio code, ``SinkThread`` for
everything else (synchronous code, asyncio, other event loops).

Both run one ``SinkServer`` in this process (``--workers`` is the command line's; an embedded
sink is one process) on a free loopback port by default, and hand back what arrived as
``MessageRecord``s: kept in memory (``store="memory"``, the default, the last
``max_messages``) or read back from the files of a ``store="maildir:DIR"``. With ``discard``
or ``mbox:`` there are no records (``messages`` and ``wait_for`` raise ``NoRecords``), only
``stats``. Any other ``SinkConfig`` field, fault options included, is a keyword argument.

Resource handling: ``open_sink`` owns a nursery holding the server; the server listens before
the block begins (``nursery.start``) and leaving the block shuts it down gracefully (sessions
in a transaction may finish it within ``grace_period``) before the block is left. A
``SinkThread`` owns a thread running its own trio loop around ``open_sink``; ``start`` returns
once the sink listens, ``stop`` asks for the graceful shutdown and joins the thread.

Error handling: whatever keeps the sink from starting (a bad option, a port in use, an
unusable store) is raised by ``open_sink``, or by ``SinkThread.start`` in the caller's thread.
An error raised in the ``async with`` block comes out as itself, not in an exception group.
A server that fails while running cancels the block (``open_sink``), or is raised by
``SinkThread.stop``. Every wait is bounded: ``wait_for`` raises ``SinkTimeout`` (and, waiting
on a ``SinkThread`` whose server has died, simply runs out of time), and a thread that does not
start or stop in time raises ``SinkError``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Any

import trio

from mailstorm.metrics_http import parse_metrics_address
from mailstorm.wire.events import Envelope

from .app import SinkServer
from .config import Address, SinkConfig, parse_address
from .records import (
    DEFAULT_MAX_MESSAGES,
    MemoryStore,
    MessageLog,
    MessageRecord,
    SinkTimeout,
)
from .stats import SinkStats
from .stores import MaildirStore

__all__ = [
    "DEFAULT_WAIT",
    "NoRecords",
    "Sink",
    "SinkError",
    "SinkThread",
    "SinkTimeout",
    "open_sink",
    "sink_config",
]

#: Seconds ``wait_for`` waits unless told otherwise.
DEFAULT_WAIT = 10.0
#: Seconds a ``SinkThread`` may take to start listening.
DEFAULT_START_TIMEOUT = 10.0
#: Seconds a ``SinkThread`` may take to stop, beyond the sink's grace period.
STOP_MARGIN = 10.0


class SinkError(RuntimeError):
    """An embedded sink did not start or stop in time, or is no longer running."""


class NoRecords(SinkError):
    """The sink's store keeps no records (``discard``, ``mbox:``)."""


def sink_config(*, faults: Iterable[str] = (), **sink_options: Any) -> SinkConfig:
    """The ``SinkConfig`` of an embedded sink: ``sink_options`` are its fields, with a free
    port on 127.0.0.1 unless ``listen`` says otherwise (``"HOST:PORT"`` strings are accepted
    in ``listen``, ``tls_listen`` and ``metrics_listen``); ``faults`` goes to the ``faults``
    field when given.

    Raises ``TypeError`` for an unknown option and ``ValueError`` for a bad value.
    """
    for name in ("listen", "tls_listen"):
        if name in sink_options:
            sink_options[name] = tuple(
                parse_address(a) if isinstance(a, str) else a for a in sink_options[name]
            )
    if isinstance(sink_options.get("metrics_listen"), str):
        sink_options["metrics_listen"] = parse_metrics_address(sink_options["metrics_listen"])
    sink_options.setdefault("listen", (Address("127.0.0.1", 0),))
    if isinstance(faults, str):
        raise TypeError(f"faults is a list of fault specs: faults=[{faults!r}]")
    faults = tuple(faults)
    if faults:
        sink_options["faults"] = faults
    return SinkConfig(**sink_options)


class Sink:
    """A running embedded sink: where it listens, what it received, its counters."""

    def __init__(self, server: SinkServer, log: MessageLog | None) -> None:
        self.server = server
        self._log = log

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the first plain listener (of the first TLS one if none is plain)."""
        return (self.server.addresses or self.server.tls_addresses)[0]

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """(host, port) of the first implicit-TLS listener, if any."""
        return self.server.tls_addresses[0] if self.server.tls_addresses else None

    @property
    def stats(self) -> SinkStats:
        """The server's live counters (sessions, messages, refusals...)."""
        return self.server.stats

    @property
    def metrics_url(self) -> str | None:
        """Where ``/metrics`` is served (``metrics_listen``), else None."""
        address = self.server.metrics_address
        return None if address is None else f"http://{address}/metrics"

    @property
    def messages(self) -> list[MessageRecord]:
        """The records of the messages accepted since the start or the last ``clear``, oldest
        first (at most ``max_messages``: see ``dropped``)."""
        return self._records().records()

    @property
    def dropped(self) -> int:
        """Records dropped (the oldest first) to keep ``max_messages``."""
        return self._records().dropped

    def clear(self) -> None:
        """Forget the records so far; ``wait_for`` then counts from zero."""
        self._records().clear()

    async def wait_for(self, count: int = 1, timeout: float = DEFAULT_WAIT) -> list[MessageRecord]:
        """Wait until ``count`` messages have been accepted since the start or the last
        ``clear``, and return ``messages``. Raises ``SinkTimeout`` after ``timeout`` seconds,
        saying how many did arrive."""
        return await self._records().wait(count, timeout)

    def _records(self) -> MessageLog:
        if self._log is None:
            raise NoRecords(
                f"store {self.server.store.describe()!r} keeps no records: "
                "use store='memory' (the default) or 'maildir:DIR'"
            )
        return self._log


def _attach_records(server: SinkServer, max_messages: int) -> MessageLog | None:
    """The log the server's store fills: its own for ``memory``, one told of each delivery for
    ``maildir:``; None for stores that keep no records."""
    store = server.store
    if isinstance(store, MemoryStore):
        return store.log
    if isinstance(store, MaildirStore):
        log = MessageLog(max_messages)

        def record(envelope: Envelope, trace: bytes, path: str) -> None:
            log.add(MessageRecord(envelope, trace=trace, path=path))

        store.on_delivered = record
        return log
    return None


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception in ``group`` (looking through nested groups), else the group."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else group


@contextlib.asynccontextmanager
async def _run_sink(config: SinkConfig, max_messages: int) -> AsyncIterator[Sink]:
    server = SinkServer.from_config(config)
    sink = Sink(server, _attach_records(server, max_messages))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                yield sink
            finally:
                server.shutdown()
    except BaseExceptionGroup as group:
        # The nursery holds two things, the server and the block: an error of either alone is
        # raised as itself, as the caller wrote it (``pytest.raises(ValueError)`` works).
        raise _sole_error(group) from None


def open_sink(
    *,
    store: str = "memory",
    faults: Iterable[str] = (),
    max_messages: int = DEFAULT_MAX_MESSAGES,
    **sink_options: Any,
) -> contextlib.AbstractAsyncContextManager[Sink]:
    """``async with open_sink(...) as sink``: a sink listening when the block begins (on a
    free 127.0.0.1 port unless ``listen`` says otherwise), shut down gracefully when it ends.

    ``store``: ``"memory"`` (records of the last ``max_messages`` messages), ``"maildir:DIR"``
    (records read back from the files), ``"discard"`` or ``"mbox:FILE"`` (no records).
    ``faults`` and ``sink_options``: ``SinkConfig`` fields (see ``sink_config``).
    """
    if store == "memory":
        store = f"memory:{max_messages}"
    config = sink_config(faults=faults, store=store, **sink_options)
    return _run_sink(config, max_messages)


class SinkThread:
    """``with SinkThread(...) as sink``: ``open_sink`` in a thread of its own with its own trio
    loop, for synchronous code and other event loops. Same options and attributes as
    ``open_sink``'s ``Sink``; ``wait_for`` blocks the caller.

    ``start`` (or entering the block) returns once the sink listens and raises here whatever
    kept it from starting; ``stop`` (or leaving the block) shuts it down gracefully, joins the
    thread and raises an error the server died of. Start once; ``stop`` is idempotent.
    """

    def __init__(
        self,
        *,
        store: str = "memory",
        faults: Iterable[str] = (),
        max_messages: int = DEFAULT_MAX_MESSAGES,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        **sink_options: Any,
    ) -> None:
        if store == "memory":
            store = f"memory:{max_messages}"
        # Built here so that a bad option is raised in the caller's thread at once.
        self.config = sink_config(faults=faults, store=store, **sink_options)
        self._max_messages = max_messages
        self._start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = False
        self._sink: Sink | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop_event: trio.Event | None = None
        self._error: BaseException | None = None

    # ---- life cycle ------------------------------------------------------------------------

    def start(self) -> SinkThread:
        """Start the thread and return once the sink listens (within ``start_timeout``)."""
        if self._thread is not None:
            raise SinkError("a SinkThread starts once")
        self._thread = threading.Thread(target=self._thread_main, name="mailstorm-sink")
        # A daemon thread: a sink a program forgot to stop must not keep it from exiting.
        self._thread.daemon = True
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            self._request_stop()
            raise SinkError(f"the sink did not start listening within {self._start_timeout:g}s")
        if self._sink is None:
            self._thread.join()
            self._raise_error()
        return self

    def stop(self) -> None:
        """Shut the sink down gracefully and join its thread (within the grace period plus
        ``STOP_MARGIN``); raise the error the server failed with, if any."""
        thread = self._thread
        if thread is None:
            return
        self._request_stop()
        timeout = self.config.grace_period + STOP_MARGIN
        thread.join(timeout)
        if thread.is_alive():
            raise SinkError(f"the sink thread did not stop within {timeout:g}s")
        self._raise_error()

    def __enter__(self) -> SinkThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # raised in the caller's thread by start or stop
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        async with _run_sink(self.config, self._max_messages) as sink:
            self._stop_event = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._sink = sink
            self._ready.set()
            # Read after the token is published, as _request_stop sets the flag before it
            # reads the token: one of the two always sees the other.
            if not self._stopping:
                await self._stop_event.wait()

    def _request_stop(self) -> None:
        self._stopping = True
        token, event = self._token, self._stop_event
        if token is not None and event is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(event.set, trio_token=token)

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    # ---- what the sink received ----------------------------------------------------------

    @property
    def sink(self) -> Sink:
        """The ``Sink`` the thread runs (its async methods belong to that thread). It stays
        readable after ``stop``: the records are still there."""
        if self._sink is None:
            raise SinkError("the sink is not started: use 'with SinkThread(...) as sink'")
        return self._sink

    @property
    def address(self) -> tuple[str, int]:
        return self.sink.address

    @property
    def host(self) -> str:
        return self.sink.host

    @property
    def port(self) -> int:
        return self.sink.port

    @property
    def tls_address(self) -> tuple[str, int] | None:
        return self.sink.tls_address

    @property
    def stats(self) -> SinkStats:
        return self.sink.stats

    @property
    def metrics_url(self) -> str | None:
        return self.sink.metrics_url

    @property
    def messages(self) -> list[MessageRecord]:
        return self.sink.messages

    @property
    def dropped(self) -> int:
        return self.sink.dropped

    def clear(self) -> None:
        self.sink.clear()

    def wait_for(self, count: int = 1, timeout: float = DEFAULT_WAIT) -> list[MessageRecord]:
        """Block until ``count`` messages have been accepted since the start or the last
        ``clear``, and return ``messages``. Raises ``SinkTimeout`` after ``timeout`` seconds.
        From any thread but the sink's own, an event loop's included (which it blocks)."""
        sink = self.sink
        if threading.current_thread() is self._thread:
            raise SinkError("wait_for would block the sink's own thread: await sink.wait_for")
        return sink._records().wait_blocking(count, timeout)
