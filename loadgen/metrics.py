"""The load generator's live Prometheus metrics (``mailstorm load --metrics-listen HOST:PORT``).

As the sink's (``mailstorm.sink.metrics``), nothing is counted here: ``LoadCollector`` reads the
run's ``RunStats`` when Prometheus scrapes, on the run's own event loop (the endpoint is a task
in ``run_load``'s nursery), so the sessions pay nothing and a scrape sees consistent numbers.

Latencies come from the run's exact HdrHistograms (microseconds) and are exported as Prometheus
histograms with the fixed ``LATENCY_BUCKETS``, one series per phase; a value is placed by its
HdrHistogram bucket (3 significant digits), and ``_sum`` is the HdrHistogram's mean times its
count, so it is exact to those digits.

With ``--procs P`` the run's parent process serves: each worker sends ``live_counters`` with
its progress (once a second), and ``ProcsMetrics`` sums the latest of each at scrape time. The
parent has no event loop of its own (it waits on the workers' queue), so there the endpoint is
a trio loop in a thread that ``ProcsMetrics.serving`` starts and joins; that thread only reads
an immutable tuple of the workers' latest counters, which the parent replaces whole.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import trio
from hdrh.histogram import HdrHistogram
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from mailstorm.load.stats import ERROR_KINDS, PhaseHistograms, RunStats
from mailstorm.metrics_http import serve_metrics

__all__ = ["LATENCY_BUCKETS", "LoadCollector", "ProcsMetrics", "live_counters", "load_registry"]

log = logging.getLogger("mailstorm.load")

PREFIX = "mailstorm_load_"
#: Upper bounds of the latency buckets, in seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


class LoadCollector(Collector):
    """Metric families from the ``RunStats`` that ``source`` gives at each scrape (the run's
    own, live); ``clock`` gives the current time on the clock of ``RunStats.started``."""

    def __init__(self, source: Callable[[], RunStats], clock: Callable[[], float]) -> None:
        self.source = source
        self.clock = clock

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        s = self.source()

        def counter(name: str, help: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, help, value=value)

        yield counter("messages_attempted", "messages started (taken from the schedule)",
                      s.attempted)
        yield counter("messages_delivered", "messages the server accepted (2xx to end of data)",
                      s.delivered)
        yield counter("messages_failed", "messages that failed (refused, error, timeout)",
                      s.failed)
        yield counter("message_bytes", "octets of messages delivered", s.bytes_delivered)
        yield counter("connections", "connections made", s.connections)
        yield counter("backoffs", "back-offs after failed connections", s.backoffs)
        yield GaugeMetricFamily(
            PREFIX + "sessions_open", "sessions running now", value=s.sessions_open
        )
        yield GaugeMetricFamily(
            PREFIX + "elapsed_seconds", "seconds since the run started",
            value=max(0.0, self.clock() - s.started),
        )
        errors = CounterMetricFamily(PREFIX + "errors", "errors, by kind", labels=["kind"])
        for kind in (*ERROR_KINDS, *sorted(set(s.errors_by_kind) - set(ERROR_KINDS))):
            errors.add_metric([kind], s.errors_by_kind.get(kind, 0))
        yield errors
        replies = CounterMetricFamily(
            PREFIX + "error_replies", "unwanted replies from the server, by code", labels=["code"]
        )
        for code, n in sorted(s.errors_by_code.items()):
            replies.add_metric([str(code)], n)
        yield replies
        reconnects = CounterMetricFamily(
            PREFIX + "reconnects",
            "reconnects after the server ended a connection between messages, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(s.reconnects.items()):
            reconnects.add_metric([reason], n)
        yield reconnects
        latency = HistogramMetricFamily(
            PREFIX + "phase_seconds",
            "reply latency per phase (connect, tls, banner, ehlo, mail, rcpt, data, eod, quit, "
            "...; message: a whole message from its scheduled start)",
            labels=["phase"],
        )
        for phase, hist in s.phases.by_phase.items():
            if hist.get_total_count():
                buckets, total_seconds = _buckets(hist)
                latency.add_metric([phase], buckets, total_seconds)
        yield latency


def _buckets(hist: HdrHistogram) -> tuple[list[tuple[str, float]], float]:
    """Cumulative counts per ``LATENCY_BUCKETS`` bound (and +Inf), and the sum in seconds."""
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    bounds_us = [bound * 1_000_000 for bound in LATENCY_BUCKETS]
    for item in hist.get_recorded_iterator():
        index = 0
        while index < len(bounds_us) and item.value_iterated_to > bounds_us[index]:
            index += 1
        counts[index] += item.count_added_in_this_iter_step
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
        cumulative += n
        buckets.append((bound, cumulative))
    total = hist.get_total_count()
    return buckets, hist.get_mean_value() * total / 1_000_000


def load_registry(source: Callable[[], RunStats], clock: Callable[[], float]) -> CollectorRegistry:
    """A registry of its own holding only the run's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LoadCollector(source, clock))
    return registry


def live_counters(stats: RunStats) -> dict[str, Any]:
    """What a ``--procs`` worker sends its parent for the metrics: picklable, cumulative."""
    return {
        "attempted": stats.attempted,
        "delivered": stats.delivered,
        "failed": stats.failed,
        "bytes_delivered": stats.bytes_delivered,
        "connections": stats.connections,
        "backoffs": stats.backoffs,
        "sessions_open": stats.sessions_open,
        "errors_by_kind": dict(stats.errors_by_kind),
        "errors_by_code": dict(stats.errors_by_code),
        "reconnects": dict(stats.reconnects),
        "phases": stats.phases.encode(),
    }


class ProcsMetrics:
    """The parent's view of a ``--procs`` run: the latest ``live_counters`` of each worker."""

    def __init__(self, workers: int) -> None:
        self._latest: list[dict[str, Any] | None] = [None] * workers
        #: What the endpoint's thread reads: replaced whole, never changed in place.
        self._published: tuple[dict[str, Any], ...] = ()
        self.started = time.monotonic()

    def publish(self, worker: int, counters: dict[str, Any]) -> None:
        self._latest[worker] = counters
        self._published = tuple(c for c in self._latest if c is not None)

    def merged(self) -> RunStats:
        """The workers' latest counters summed into a ``RunStats`` (histograms merged)."""
        stats = RunStats(started=self.started)
        for part in self._published:
            for name in ("attempted", "delivered", "failed", "bytes_delivered", "connections",
                         "backoffs", "sessions_open"):
                setattr(stats, name, getattr(stats, name) + part[name])
            stats.errors_by_kind.update(Counter(part["errors_by_kind"]))
            stats.errors_by_code.update(Counter({int(k): n for k, n in
                                                 part["errors_by_code"].items()}))
            stats.reconnects.update(Counter(part["reconnects"]))
            stats.phases.merge(PhaseHistograms.decode(part["phases"]))
        return stats

    @contextmanager
    def serving(self, sock: socket.socket) -> Iterator[None]:
        """Serve ``/metrics`` from ``merged`` in a thread with its own trio loop, for as long
        as the block runs; the thread is joined when the block ends."""
        registry = load_registry(self.merged, time.monotonic)
        ready = threading.Event()
        handle: list[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = []

        async def serve() -> None:
            with trio.CancelScope() as scope:
                handle.append((trio.lowlevel.current_trio_token(), scope))
                ready.set()
                await serve_metrics(sock, registry)

        def run() -> None:
            try:
                trio.run(serve)
            except Exception:
                # The run goes on without its endpoint rather than fail for it.
                log.exception("the metrics endpoint failed")
            finally:
                ready.set()

        thread = threading.Thread(target=run, name="mailstorm-metrics")
        thread.start()
        ready.wait()
        try:
            yield
        finally:
            if handle:
                token, scope = handle[0]
                with suppress(trio.RunFinishedError):
                    token.run_sync_soon(scope.cancel)
            thread.join()
