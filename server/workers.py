"""``mailstorm sink --workers N``: N sink processes sharing the listening ports, one supervisor.

Each worker is an ordinary ``mailstorm sink`` process whose listeners set SO_REUSEPORT, so the
kernel spreads new connections over the workers and every core serves mail. The supervisor
(this module, a trio program) owns the workers:

- it reserves any port 0 first (a bound, non-listening SO_REUSEPORT socket), so all workers
  share the one port it picked;
- it starts the workers in their own session, so a terminal's Ctrl-C reaches only the
  supervisor, which decides what the workers are told;
- it reads one JSON line of counters per worker per ``REPORT_INTERVAL`` from a pipe and sums
  them; the last report of a crashed worker is kept, so totals never go backwards (but what a
  killed worker did after its last report, at most ``REPORT_INTERVAL`` earlier, is not seen);
- it restarts a worker that exits without being asked to, with a back-off when crashes repeat;
- SIGINT/SIGTERM are forwarded as SIGTERM (graceful shutdown in every worker); a second signal
  is forwarded again, which makes the workers skip their grace period.

Resource handling: every worker process belongs to a task in the supervisor's nursery; when
``run`` returns, all of them have exited. If the supervisor itself dies, the workers see their
report pipe break and shut down gracefully.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence

import trio

from mailstorm.metrics_http import serve_metrics

from .config import Address
from .stats import FAULT_KEY_PREFIX

__all__ = ["WorkerSupervisor", "reserve_ports"]

log = logging.getLogger("mailstorm.sink")

#: How often each worker reports its counters.
REPORT_INTERVAL = 0.5
#: More crashes than this within ``CRASH_WINDOW`` seconds make the supervisor wait before the
#: next restart, so a worker that dies at start-up does not spin.
CRASH_LIMIT = 3
CRASH_WINDOW = 10.0
CRASH_BACKOFF = 2.0
#: Counters in the totals from the start, before any worker has reported (``totals_line``
#: reads them); every other number a worker reports is summed too (``_summed_names``).
_SUMMED = (
    "sessions_total",
    "sessions_active",
    "sessions_refused",
    "tls_sessions",
    "messages",
    "bytes",
    "recipients",
    "messages_refused",
    "storage_failures",
    "auth_failures",
    "faults_replied",
    "faults_delayed",
    "faults_dropped",
)
#: Counters of a session that ended with its worker must not stay "active".
_GAUGES = ("sessions_active",)


#: Keys of a worker's report that are not summed (metrics, issue 12: every other is).
_NOT_SUMMED = ("pid", "uptime")


def _summed_names(snapshot: dict[str, float]) -> list[str]:
    """The counters of a worker's report that are summed: ``_SUMMED`` and every other number
    (the injected faults by point and kind, ``faults.EOD.452``, replies by code, the store
    histogram's buckets), whose names depend on what happened."""
    return [
        *_SUMMED,
        *(
            name
            for name, value in snapshot.items()
            if name not in _SUMMED
            and name not in _NOT_SUMMED
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ),
    ]


def reserve_ports(addresses: Sequence[Address]) -> tuple[list[Address], list[socket.socket]]:
    """Replace port 0 by a concrete free port, held by a bound non-listening SO_REUSEPORT socket.

    The kernel only hands connections to *listening* sockets, so the reservation takes none;
    it just keeps the port from being given to anyone else until the workers have bound it.
    """
    concrete: list[Address] = []
    holders: list[socket.socket] = []
    for address in addresses:
        if address.port != 0:
            concrete.append(address)
            continue
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        holder = socket.socket(family, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((address.host, 0))
        holders.append(holder)
        concrete.append(Address(address.host, int(holder.getsockname()[1])))
    return concrete, holders


class WorkerSupervisor:
    """Runs ``count`` workers of ``worker_args`` (``python -m mailstorm.sink`` arguments) until
    told."""

    def __init__(
        self,
        worker_args: Sequence[str],
        count: int,
        *,
        stats_interval: float,
        banner: str = "mailstorm sink workers",
        metrics_socket: socket.socket | None = None,
    ) -> None:
        self.worker_args = [*worker_args, "--reuse-port", "--worker-report", f"{REPORT_INTERVAL}"]
        self.count = count
        self.stats_interval = stats_interval
        #: Where the sink listens and stores, said once for all workers when they serve.
        self.banner = banner
        self.stopping = False
        self.pids: list[int | None] = [None] * count
        self.restarts = 0
        self._current: list[dict[str, float]] = [{} for _ in range(count)]
        self._retired: dict[str, float] = dict.fromkeys(_SUMMED, 0)
        self._processes: list[trio.Process | None] = [None] * count
        self._ready = [trio.Event() for _ in range(count)]
        self._failed_exit = False
        #: Serves ``/metrics`` from ``totals`` once the workers serve (``--metrics-listen``).
        self.metrics_socket = metrics_socket

    # ---- counters --------------------------------------------------------------------------

    def totals(self) -> dict[str, float]:
        """Counters summed over the workers, including those of workers that were replaced."""
        totals = dict(self._retired)
        for snapshot in self._current:
            for name in _summed_names(snapshot):
                totals[name] = totals.get(name, 0) + snapshot.get(name, 0)
        return totals

    def totals_line(self) -> str:
        t = self.totals()
        faults = ", ".join(
            f"{name.removeprefix(FAULT_KEY_PREFIX).replace('.', ' ')} x{int(n)}"
            for name, n in sorted(t.items())
            if name.startswith(FAULT_KEY_PREFIX)
        )
        proxy_refused = sum(n for name, n in t.items() if name.startswith("proxy_refused_"))
        return (
            f"{self.count} workers: sessions {int(t['sessions_active'])} active / "
            f"{int(t['sessions_total'])} total, messages {int(t['messages'])}, "
            f"bytes {int(t['bytes'])}"
            + (f", worker restarts {self.restarts}" if self.restarts else "")
            + (f", faults {faults}" if faults else "")
            + (f", PROXY refused {int(proxy_refused)}" if proxy_refused else "")
        )

    # ---- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Start the workers; report started once all are serving; return the exit status."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                for index in range(self.count):
                    nursery.start_soon(self._keep_worker, index)
                for ready in self._ready:
                    await ready.wait()
                task_status.started()
                # One line for the whole sink: the workers leave theirs to this one.
                log.info(
                    "%s; %d workers serving (pids %s)",
                    self.banner,
                    self.count,
                    ", ".join(str(pid) for pid in self.pids),
                    extra={"event": "listening", "workers": self.count, "pids": self.pids},
                )
                if self.metrics_socket is not None:
                    await nursery.start(self._serve_metrics, self.metrics_socket)
                if self.stats_interval > 0:
                    nursery.start_soon(self._report, self.stats_interval)
                nursery.start_soon(self._forward_signals, signals)
                await self._all_stopped()
                nursery.cancel_scope.cancel()
        log.info("stopped: %s", self.totals_line(), extra={"event": "stopped",
                                                            "counters": self.totals()})
        return 1 if self._failed_exit else 0

    def metrics_snapshot(self) -> dict[str, float]:
        """What ``/metrics`` shows: the sums, and the workers' count and restarts."""
        return {**self.totals(), "workers": self.count, "worker_restarts": self.restarts}

    async def _serve_metrics(
        self, sock: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve ``/metrics`` from the sums over the workers; say where once it accepts."""
        from .metrics import sink_registry  # prometheus-client only when metrics are asked for

        async with trio.open_nursery() as nursery:
            address = await nursery.start(serve_metrics, sock, sink_registry(self.metrics_snapshot))
            url = f"http://{address}/metrics"
            log.info("metrics at %s", url, extra={"event": "metrics_listening", "url": url})
            task_status.started()

    def stop(self) -> None:
        """Graceful shutdown of every worker (a second call skips their grace period)."""
        self.stopping = True
        for process in self._processes:
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)

    async def _all_stopped(self) -> None:
        while not (self.stopping and all(p is None for p in self._processes)):
            await trio.sleep(0.05)

    async def _forward_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            extra = {"event": "shutdown", "signal": name, "immediately": self.stopping}
            if not self.stopping:
                log.info(
                    "%s: shutting down %d workers gracefully (again to stop at once)",
                    name,
                    self.count,
                    extra=extra,
                )
            else:
                log.info("%s: stopping the workers now", name, extra=extra)
            self.stop()

    async def _keep_worker(self, index: int) -> None:
        """Run worker ``index``; start it again whenever it exits unasked."""
        crashes: deque[float] = deque()
        while not self.stopping:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "mailstorm.sink", *self.worker_args],
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            self._processes[index] = process
            self.pids[index] = process.pid
            try:
                assert process.stdout is not None
                await self._read_reports(index, process.stdout)
                status = await process.wait()
            finally:
                self._processes[index] = None
                self._retire(index)
            if self.stopping:
                # -SIGTERM: our own SIGTERM reached a worker still starting, before its signal
                # handler was in place. It served no one yet, so that is the stop we asked for.
                if status not in (0, -signal.SIGTERM):
                    self._failed_exit = True
                return
            if not self._ready[index].is_set():
                # It never served: restarting would fail the same way (bad port, bad file).
                log.error(
                    "worker %d (pid %d) failed to start (status %s); stopping",
                    index,
                    process.pid,
                    status,
                    extra={"event": "worker_failed", "worker": index, "pid": process.pid,
                           "status": status},
                )
                self._failed_exit = True
                self.stop()
                for ready in self._ready:
                    ready.set()
                return
            # An exit nobody asked for: a crash (or a kill). Restart, with back-off.
            self.restarts += 1
            now = trio.current_time()
            crashes.append(now)
            while crashes and crashes[0] < now - CRASH_WINDOW:
                crashes.popleft()
            log.error(
                "worker %d (pid %d) exited with status %s; restarting",
                index,
                process.pid,
                status,
                extra={"event": "worker_exited", "worker": index, "pid": process.pid,
                       "status": status},
            )
            if len(crashes) > CRASH_LIMIT:
                await trio.sleep(CRASH_BACKOFF)

    async def _read_reports(self, index: int, stdout: trio.abc.ReceiveStream) -> None:
        pending = b""
        while True:
            data = await stdout.receive_some(65536)
            if not data:
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    self._current[index] = json.loads(line)
                except ValueError:
                    continue
                self._ready[index].set()

    def _retire(self, index: int) -> None:
        """Keep the counters of a worker that exited; its sessions are no longer active."""
        snapshot = self._current[index]
        for name in _summed_names(snapshot):
            if name not in _GAUGES:
                self._retired[name] = self._retired.get(name, 0) + snapshot.get(name, 0)
        self._current[index] = {}

    async def _report(self, interval: float) -> None:
        last_messages = 0.0
        last_time = trio.current_time()
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            messages = self.totals()["messages"]
            rate = (messages - last_messages) / max(now - last_time, 1e-9)
            last_messages, last_time = messages, now
            log.info(
                "%s, %.1f msg/s",
                self.totals_line(),
                rate,
                extra={"event": "stats", "counters": self.totals(), "rate": round(rate, 1)},
            )
