"""One process's load run: resolve the target, start the sessions, feed them messages.

This module owns the run's structure in one trio process: a nursery of ``--sessions`` session
tasks (this process's share), each looping on the ticket dispenser, plus a progress task. It
never formats output and never starts processes (``procs`` does that, by calling ``run_load``
in each worker).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import trio

from mailstorm._net.readiness import open_readiness_hub
from mailstorm.load.config import ConfigError, LoadConfig
from mailstorm.load.schedule import MessageTickets, OpenLoopSchedule, session_start_offset
from mailstorm.load.session import LoadContext, LoadSession
from mailstorm.load.stats import RunStats
from mailstorm.load.tls import client_ssl_context
from mailstorm.load.workload import MessageFactory

__all__ = ["ProgressCallback", "build_factory", "resolve_target", "run_load"]

ProgressCallback = Callable[[RunStats, float], None]


async def resolve_target(config: LoadConfig) -> tuple[int, tuple]:
    """The address family and socket address to connect to.

    A name with several addresses (``localhost``: ::1 and 127.0.0.1) is probed once, in order,
    and the first that accepts a connection is used for the whole run.
    """
    if config.probed_address is not None:
        return config.probed_address
    target = config.target
    try:
        infos = await trio.socket.getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve {target.host!r}: {exc.strerror}") from None
    candidates = list(dict.fromkeys((family, addr) for family, _, _, _, addr in infos))
    if config.source_addresses:
        source_family = socket.AF_INET6 if ":" in config.source_addresses[0] else socket.AF_INET
        candidates = [c for c in candidates if c[0] == source_family] or candidates
    if len(candidates) == 1:
        return candidates[0]
    for family, addr in candidates:
        with trio.move_on_after(min(config.timeout, 5.0)):
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            try:
                await sock.connect(addr)
            except OSError:
                continue
            finally:
                sock.close()
            return family, addr
    return candidates[0]


def build_factory(config: LoadConfig) -> MessageFactory:
    from pathlib import Path

    eml_paths = MessageFactory.eml_files(Path(config.eml)) if config.eml else None
    return MessageFactory(
        sizes=config.size_mix,
        eml_paths=eml_paths,
        mail_from=config.mail_from,
        rcpt_to=config.rcpt_to,
        rcpts=config.rcpts,
    )


async def _session_main(ctx: LoadContext, tickets: MessageTickets, start_at: float) -> None:
    if start_at > trio.current_time():
        await trio.sleep_until(start_at)
    session = LoadSession(ctx)
    protocol = session.protocol
    closed_loop = tickets.schedule is None
    ctx.stats.sessions_open += 1
    try:
        while True:
            if closed_loop and protocol.backoff_until:
                await session.wait_backoff(tickets.deadline)
            ticket = await tickets.take()
            if ticket is None:
                break
            await session.send_messages(*ticket, tickets)
        await session.quit()
    finally:
        ctx.stats.sessions_open -= 1
        if session.stream is not None:
            # Cancelled (Ctrl-C): do not wait for anything, just close.
            with trio.CancelScope(shield=True):
                await session.abort()


async def _progress_loop(stats: RunStats, interval: float, callback: ProgressCallback) -> None:
    while True:
        await trio.sleep(interval)
        callback(stats, trio.current_time())


#: How often the event loop's lateness is sampled.
LOOP_LAG_PERIOD = 0.01


async def _sample_loop_lag(stats: RunStats) -> None:
    """Sleep ``LOOP_LAG_PERIOD`` over and over and record how late each wake-up is; and at
    each whole second of the run, close that second's latencies (the report's latency over
    time).

    A saturated generator wakes late; its latencies then include its own delay, which the
    report says rather than passing it off as the server's.
    """
    next_second = stats.started + 1.0
    while True:
        before = trio.current_time()
        await trio.sleep(LOOP_LAG_PERIOD)
        now = trio.current_time()
        stats.record_loop_lag(now - before - LOOP_LAG_PERIOD)
        while now >= next_second:
            stats.close_second()
            next_second += 1.0


async def run_load(
    config: LoadConfig,
    stats: RunStats | None = None,
    *,
    worker: int = 0,
    workers: int = 1,
    factory: MessageFactory | None = None,
    on_progress: ProgressCallback | None = None,
    metrics_socket: socket.socket | None = None,
) -> RunStats:
    """Run this process's share of the load and return what it measured.

    ``stats`` may be passed in so that a caller interrupted (Ctrl-C) still has the partial
    results. ``worker``/``workers`` select this process's share of sessions and messages.
    ``metrics_socket`` (listening): serve the live counters at ``/metrics`` during the run.
    """
    stats = stats if stats is not None else RunStats()
    family, sockaddr = await resolve_target(config)
    ssl_context = None
    if config.target.implicit_tls or config.starttls:
        ssl_context = client_ssl_context(verify=config.tls_verify, ca_file=config.ca_file)
    ctx = LoadContext(
        config=config,
        stats=stats,
        factory=factory or build_factory(config),
        family=family,
        sockaddr=sockaddr,
        ssl_context=ssl_context,
        server_hostname=config.tls_server_name or config.target.host,
        source_addresses=list(config.source_addresses),
    )
    start = trio.current_time()
    cpu_start = time.process_time()
    stats.started = start
    stats.started_wall = time.time()
    schedule = OpenLoopSchedule(config.rate, config.ramp_up) if config.rate is not None else None
    tickets = MessageTickets(
        start=start,
        messages=config.messages,
        duration=config.duration,
        schedule=schedule,
        worker=worker,
        workers=workers,
    )
    sessions = config.sessions_for(worker, workers)
    try:
        # The readiness hub serves every session's socket: it lives as long as they do.
        async with open_readiness_hub() as ctx.hub, trio.open_nursery() as outer:
            if on_progress is not None:
                outer.start_soon(_progress_loop, stats, config.progress_interval, on_progress)
            outer.start_soon(_sample_loop_lag, stats)
            if metrics_socket is not None:
                from mailstorm.load.metrics import load_registry
                from mailstorm.metrics_http import serve_metrics

                registry = load_registry(lambda: stats, trio.current_time)
                await outer.start(serve_metrics, metrics_socket, registry)
            async with trio.open_nursery() as nursery:
                for j in range(sessions):
                    # In closed loop, --ramp-up staggers session starts over the ramp; in open
                    # loop the schedule itself ramps, and every session is there from the start.
                    delay = 0.0
                    if schedule is None:
                        delay = session_start_offset(
                            worker + j * workers, config.sessions, config.ramp_up
                        )
                    nursery.start_soon(_session_main, ctx, tickets, start + delay)
            outer.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Ctrl-C arrives inside the nurseries, wrapped in exception groups: give callers the
        # plain KeyboardInterrupt they can catch to report what was measured so far.
        interrupt, rest = group.split(KeyboardInterrupt)
        if interrupt is not None and rest is None:
            raise KeyboardInterrupt from None
        raise
    finally:
        stats.close_second()  # the last, partial second
        stats.wall = trio.current_time() - start
        stats.cpu_s = time.process_time() - cpu_start
        stats.elapsed = (stats.last_message_at - start) if stats.last_message_at else 0.0
    return stats
