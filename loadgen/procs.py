"""``--procs P``: the run split over P worker processes, each its own trio loop.

This module owns starting the workers, starting them together, relaying their progress to the
display, and merging their results exactly (``RunStats.merge``: counters add, histograms are
added bucket by bucket after an encode/decode round trip). Worker ``w`` of ``P`` runs the
sessions ``w, w+P, ...`` and the messages numbered ``w, w+P, ...`` of the one global schedule, so
the processes together send exactly ``--messages`` and, in open loop, exactly the schedule of
``--rate``. It never speaks SMTP itself.

Workers are started with the "spawn" method: a fresh interpreter that imports only what it
needs, safe whatever threads or trio state the parent has.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue as queue_module
import socket
import traceback
from typing import TYPE_CHECKING, Any

from mailstorm.load.config import ConfigError, LoadConfig
from mailstorm.load.live import ProgressDisplay, ProgressSnapshot
from mailstorm.load.stats import RunStats

if TYPE_CHECKING:
    from mailstorm.load.metrics import ProcsMetrics

__all__ = ["WorkerFailed", "run_procs"]

#: Seconds to wait for all workers to be ready before giving up.
START_TIMEOUT = 60.0
#: After Ctrl-C, seconds to wait for each worker's partial results.
INTERRUPT_PATIENCE = 5.0


class WorkerFailed(RuntimeError):
    """A worker process crashed or reported an exception."""


def _worker_main(
    config: LoadConfig,
    worker: int,
    workers: int,
    results: Any,
    go: Any,
) -> None:
    """Entry point of a worker process."""
    import trio

    from mailstorm.load.runner import build_factory, run_load

    # The open-files limit needs no raising here: the parent raised it, and a spawned worker
    # inherits it.
    try:
        factory = build_factory(config)
        results.put(("ready", worker, None))
        go.wait()

        def on_progress(stats: RunStats, now: float) -> None:
            if not config.quiet:
                snap = ProgressSnapshot.take(stats, now)
                results.put(("progress", worker, _snapshot_to_wire(snap)))
            if config.metrics_listen is not None:  # metrics (issue 12): the parent serves
                from mailstorm.load.metrics import live_counters

                results.put(("metrics", worker, live_counters(stats)))

        stats = RunStats()
        # Ctrl-C reaches every worker too: stop, and report what was measured.
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(
                lambda: run_load(
                    config,
                    stats,
                    worker=worker,
                    workers=workers,
                    factory=factory,
                    on_progress=(
                        None if config.quiet and config.metrics_listen is None else on_progress
                    ),
                )
            )
        results.put(("result", worker, stats.to_dict()))
    except ConfigError as exc:
        results.put(("config-error", worker, str(exc)))
    except BaseException:
        results.put(("error", worker, traceback.format_exc()))


def _snapshot_to_wire(snap: ProgressSnapshot) -> dict[str, Any]:
    return {
        "elapsed": snap.elapsed,
        "attempted": snap.attempted,
        "delivered": snap.delivered,
        "failed": snap.failed,
        "bytes": snap.bytes,
        "interval": snap.interval.encode() if snap.interval.get_total_count() else None,
        "errors_by_kind": snap.errors_by_kind,
        "reconnects": snap.reconnects,
        "backoffs": snap.backoffs,
    }


def _snapshot_from_wire(data: dict[str, Any]) -> ProgressSnapshot:
    from hdrh.histogram import HdrHistogram

    snap = ProgressSnapshot(
        elapsed=data["elapsed"],
        attempted=data["attempted"],
        delivered=data["delivered"],
        failed=data["failed"],
        bytes=data["bytes"],
        errors_by_kind=data["errors_by_kind"],
        reconnects=data.get("reconnects", 0),
        backoffs=data.get("backoffs", 0),
    )
    if data["interval"]:
        snap.interval.add(HdrHistogram.decode(data["interval"]))
    return snap


def run_procs(
    config: LoadConfig,
    stats: RunStats | None = None,
    display: ProgressDisplay | None = None,
    metrics_socket: socket.socket | None = None,
) -> RunStats:
    """Run ``config.procs`` workers and merge their results into ``stats``; serve their live
    counters at ``/metrics`` on ``metrics_socket`` (listening) while they run.

    On Ctrl-C (which every worker receives too) the workers stop and still report what they
    measured; those results are merged before KeyboardInterrupt propagates.
    """
    merged = stats if stats is not None else RunStats()
    workers = config.procs
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    go = ctx.Event()
    processes = [
        ctx.Process(
            target=_worker_main,
            args=(config, w, workers, results, go),
            name=f"mailstorm-load-{w}",
            daemon=True,
        )
        for w in range(workers)
    ]
    metrics = None
    serving: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if metrics_socket is not None:
        from mailstorm.load.metrics import ProcsMetrics

        metrics = ProcsMetrics(workers)
        serving = metrics.serving(metrics_socket)
    for p in processes:
        p.start()
    try:
        with serving:
            _wait_ready(processes, results)
            go.set()
            try:
                _collect(processes, results, merged, display, metrics=metrics)
            except KeyboardInterrupt:
                _collect(processes, results, merged, None, patience=INTERRUPT_PATIENCE)
                raise
    finally:
        for p in processes:
            p.join(timeout=1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return merged


def _next_message(processes: list[Any], results: Any, timeout: float) -> tuple[str, int, Any]:
    """The next worker message; raises WorkerFailed if a worker died without a word."""
    while True:
        try:
            return results.get(timeout=timeout)
        except queue_module.Empty:
            for p in processes:
                if not p.is_alive() and p.exitcode not in (0, None):
                    raise WorkerFailed(f"worker {p.name} died (exit code {p.exitcode})") from None
            if timeout >= INTERRUPT_PATIENCE:
                raise WorkerFailed(f"no word from the workers in {timeout:g}s") from None


def _wait_ready(processes: list[Any], results: Any) -> None:
    ready = 0
    while ready < len(processes):
        kind, worker, payload = _next_message(processes, results, START_TIMEOUT)
        if kind == "ready":
            ready += 1
        elif kind == "config-error":
            raise ConfigError(payload)
        elif kind == "error":
            raise WorkerFailed(f"worker {worker} failed:\n{payload}")


def _collect(
    processes: list[Any],
    results: Any,
    merged: RunStats,
    display: ProgressDisplay | None,
    *,
    patience: float | None = None,
    metrics: ProcsMetrics | None = None,
) -> None:
    """Relay progress until every worker has sent its result; merge each result.

    With ``patience``, give up (quietly) after that many seconds without a message.
    """
    latest: dict[int, ProgressSnapshot] = {}
    reported: set[int] = set()
    done: set[int] = set()
    while len(done) < len(processes):
        try:
            kind, worker, payload = _next_message(processes, results, patience or 1.0)
        except WorkerFailed:
            if patience is not None:
                return
            raise
        if kind == "progress":
            latest[worker] = _snapshot_from_wire(payload)
            reported.add(worker)
            if display is not None and len(reported) + len(done) >= len(processes):
                # One combined line or panel per round of worker reports.
                combined = ProgressSnapshot(elapsed=0.0)
                for snap in latest.values():
                    combined.add(snap)
                reported.clear()
                display.update(combined)
        elif kind == "metrics":
            if metrics is not None:
                metrics.publish(worker, payload)
        elif kind == "result":
            result = RunStats.from_dict(payload)
            if metrics is not None:
                from mailstorm.load.metrics import live_counters

                metrics.publish(worker, live_counters(result))
            merged.merge(result)
            done.add(worker)
            latest.pop(worker, None)
        elif kind == "config-error":
            raise ConfigError(payload)
        elif kind == "error":
            raise WorkerFailed(f"worker {worker} failed:\n{payload}")
