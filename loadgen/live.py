"""The live progress display: a rich panel on a terminal, plain periodic lines otherwise.

This module owns what the user sees while a run is in progress: elapsed time, delivered
messages, current rate, errors and the running p99 of whole-message latency over the last
interval. It never measures anything (it is handed ``ProgressSnapshot`` values) and writes only
to the console it is given (stderr by default, so stdout stays for the report).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.live import Live
from rich.table import Table

from mailstorm.load.stats import RunStats, new_histogram

__all__ = ["ProgressDisplay", "ProgressSnapshot"]

#: Without a terminal, by default a line every this many seconds, to keep logs readable.
PLAIN_EVERY = 5.0


@dataclass(slots=True)
class ProgressSnapshot:
    """Cumulative counters at ``elapsed`` seconds, and message latencies since the last one."""

    elapsed: float
    attempted: int = 0
    delivered: int = 0
    failed: int = 0
    bytes: int = 0
    interval: HdrHistogram = field(default_factory=new_histogram)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    #: Reconnects after the server ended a connection between messages, and back-offs after
    #: failed connections, so far.
    reconnects: int = 0
    backoffs: int = 0

    @classmethod
    def take(cls, stats: RunStats, now: float) -> ProgressSnapshot:
        """Read the stats (and reset their interval histogram)."""
        return cls(
            elapsed=now - stats.started,
            attempted=stats.attempted,
            delivered=stats.delivered,
            failed=stats.failed,
            bytes=stats.bytes_delivered,
            interval=stats.take_interval(),
            errors_by_kind=dict(stats.errors_by_kind),
            reconnects=sum(stats.reconnects.values()),
            backoffs=stats.backoffs,
        )

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())

    def add(self, other: ProgressSnapshot) -> None:
        """Combine the snapshots of several processes."""
        self.elapsed = max(self.elapsed, other.elapsed)
        self.attempted += other.attempted
        self.delivered += other.delivered
        self.failed += other.failed
        self.bytes += other.bytes
        self.reconnects += other.reconnects
        self.backoffs += other.backoffs
        self.interval.add(other.interval)
        for kind, n in other.errors_by_kind.items():
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + n


class ProgressDisplay:
    """Shows snapshots; ``live`` picks the rich panel (terminal) or plain lines."""

    def __init__(
        self,
        console: Console,
        *,
        live: bool,
        target: str = "",
        target_rate: float | None = None,
        plain_every: float = PLAIN_EVERY,
    ) -> None:
        self.console = console
        self.plain_every = plain_every
        self.live_mode = live
        self.target = target
        self.target_rate = target_rate
        self._live: Live | None = None
        self._previous = ProgressSnapshot(0.0)
        #: Plain mode: the snapshot of the last printed line, rates are taken since it.
        self._line_base = ProgressSnapshot(0.0)
        self._pending = new_histogram()

    def start(self) -> None:
        if self.live_mode:
            self._live = Live(
                console=self.console, auto_refresh=False, transient=True, redirect_stdout=False
            )
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def update(self, snap: ProgressSnapshot) -> None:
        if self._live is not None:
            self._show_panel(snap)
        else:
            self._maybe_print_line(snap)

    def _show_panel(self, snap: ProgressSnapshot) -> None:
        assert self._live is not None
        rate, mb_rate = self._rates(self._previous, snap)
        self._previous = snap
        panel = self._panel(snap, rate, mb_rate, self._p99_ms(snap.interval))
        self._live.update(panel, refresh=True)

    def _maybe_print_line(self, snap: ProgressSnapshot) -> None:
        self._pending.add(snap.interval)
        since = self._line_base
        if snap.elapsed - since.elapsed < self.plain_every - 1e-3:
            return
        rate, mb_rate = self._rates(since, snap)
        p99 = self._p99_ms(self._pending)
        self._pending = new_histogram()
        self._line_base = snap
        self.console.print(
            f"[{snap.elapsed:7.1f}s] delivered {snap.delivered} ({rate:.1f} msg/s, "
            f"{mb_rate:.2f} MB/s) failed {snap.failed} errors {snap.errors} "
            f"p99(message) {p99}" + self._connection_note(snap),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    @staticmethod
    def _connection_note(snap: ProgressSnapshot) -> str:
        """Reconnects and back-offs so far, when there were any."""
        parts = []
        if snap.reconnects:
            parts.append(f"reconnects {snap.reconnects}")
        if snap.backoffs:
            parts.append(f"back-offs {snap.backoffs}")
        return (" " + " ".join(parts)) if parts else ""

    @staticmethod
    def _rates(before: ProgressSnapshot, after: ProgressSnapshot) -> tuple[float, float]:
        span = after.elapsed - before.elapsed
        if span <= 0:
            return 0.0, 0.0
        msg_rate = (after.delivered - before.delivered) / span
        return msg_rate, (after.bytes - before.bytes) / span / 1e6

    @staticmethod
    def _p99_ms(hist: HdrHistogram) -> str:
        if not hist.get_total_count():
            return "-"
        return f"{hist.get_value_at_percentile(99.0) / 1000:.2f}ms"

    def _panel(self, snap: ProgressSnapshot, rate: float, mb_rate: float, p99: str) -> Table:
        table = Table.grid(padding=(0, 2))
        target_rate = f" / {self.target_rate:g} target" if self.target_rate else ""
        table.add_row("[bold]mailstorm load[/]", self.target, f"{snap.elapsed:.1f}s")
        table.add_row("delivered", f"[green]{snap.delivered}[/] of {snap.attempted}", "")
        table.add_row("rate", f"{rate:.1f} msg/s{target_rate}", f"{mb_rate:.2f} MB/s")
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(snap.errors_by_kind.items()))
        style = "red" if snap.errors else "green"
        table.add_row("errors", f"[{style}]{snap.errors}[/] (failed {snap.failed})", kinds)
        table.add_row("p99 message", p99, "(last interval)")
        if snap.reconnects or snap.backoffs:
            table.add_row(
                "connections",
                f"reconnects {snap.reconnects}",
                f"back-offs after failures {snap.backoffs}",
            )
        return table
