"""What a run measured: per-phase latency histograms, counters, errors and the timeline.

This module owns the measurements and their exact merge across worker processes. Latencies are
recorded as integer microseconds into one ``HdrHistogram`` per phase; merging encodes and decodes
the histograms and adds them, so percentiles of a ``--procs`` run are those of all samples, not
an average of averages. It never does I/O and never reads a clock: callers pass times.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from mailstorm.wire.client import PHASES as CLIENT_PHASES

__all__ = [
    "ERROR_KINDS",
    "HIGHEST_US",
    "PER_SECOND_PHASES",
    "PHASES",
    "PhaseHistograms",
    "RunStats",
    "Timeline",
    "counts_percentile",
    "histogram_mean",
    "new_histogram",
    "value_at_percentiles",
]

#: Timed phases in report order. ``tls`` is a full TLS handshake (implicit TLS, smtps://, or
#: after STARTTLS), ``tls_resumed`` one that resumed an earlier TLS session, ``bdat`` an
#: intermediate BDAT chunk, ``message`` a whole message from its (scheduled) start to the 2xx to
#: its end of data.
PHASES = ("connect", "tls", "tls_resumed", *CLIENT_PHASES, "message")

#: Error kinds, in report order. ``connect`` is a connect failure other than a refusal (no
#: route, no free local port), ``tls`` a failed TLS handshake or TLS error, ``backoff`` a
#: message due (open loop) while its session backed off after a failed connection.
ERROR_KINDS = (
    "refused",
    "connect",
    "reset",
    "timeout",
    "4xx",
    "5xx",
    "protocol",
    "tls",
    "backoff",
)

#: One hour in microseconds: anything slower is recorded as one hour.
HIGHEST_US = 3_600_000_000
_SIGNIFICANT_FIGURES = 3
#: Distinct values a phase collects before they are moved into its histogram.
MAX_PENDING_VALUES = 50_000
#: How many distinct error texts a report keeps as examples.
MAX_ERROR_SAMPLES = 20
#: Phases whose latency is also kept per second of the run (the report's latency over time).
PER_SECOND_PHASES = ("eod", "message")
#: Significant digits of the per-second latencies: a value is kept as the middle of its
#: bucket, within 5% (exact below 100 us); a second then holds a hundred or so buckets, packed.
_PER_SECOND_DIGITS = 2


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIGHEST_US, _SIGNIFICANT_FIGURES)


def value_at_percentiles(hist: HdrHistogram, percentiles: Sequence[float]) -> list[int]:
    """``hist.get_value_at_percentile(p)`` for every ``p``, in one pass over the counts.

    The hdrh package walks the whole counts array in Python once per percentile (or slower,
    for its dict variant); a report asks for dozens of percentiles over a dozen phases.
    """
    results = [0] * len(percentiles)
    total = hist.get_total_count()
    if not total:
        return results
    targets = sorted(
        (max(int(min(p, 100.0) * total / 100 + 0.5), 1), i) for i, p in enumerate(percentiles)
    )
    t = 0
    running = 0
    for index, count in enumerate(hist.counts):
        if not count:
            continue
        running += count
        while running >= targets[t][0]:
            i = targets[t][1]
            value = hist.get_value_from_index(index)
            results[i] = (
                hist.get_highest_equivalent_value(value)
                if percentiles[i]
                else hist.get_lowest_equivalent_value(value)
            )
            t += 1
            if t == len(targets):
                return results
    return results


def histogram_mean(hist: HdrHistogram) -> float:
    """``hist.get_mean_value()`` without hdrh's per-value iterator objects."""
    total = hist.get_total_count()
    if not total:
        return 0.0
    weighted = 0
    value_at = hist.get_value_from_index
    highest = hist.get_highest_equivalent_value
    for index, count in enumerate(hist.counts):
        if count:
            # The middle of the bucket's range, as hdrh's mean uses.
            low = value_at(index)
            weighted += count * (low + ((highest(low) - low + 1) >> 1))
    return weighted / total


class PhaseHistograms:
    """One latency histogram per phase, in microseconds.

    ``record`` only counts the value in a per-phase dict (a dict increment costs a small
    fraction of ``HdrHistogram.record_value`` in Python); the counts go into the histograms in
    bulk, one ``record_value(value, count)`` per distinct value, whenever the histograms are
    read or a dict grows large. The histograms end up exactly as if every value had been
    recorded one by one.
    """

    __slots__ = ("_carry", "_hists", "_pending", "_seen")

    def __init__(self) -> None:
        self._hists: dict[str, HdrHistogram] = {phase: new_histogram() for phase in PHASES}
        self._pending: dict[str, dict[int, int]] = {phase: {} for phase in PHASES}
        #: For ``take_recent``: each per-second phase's pending counts at the last take, and
        #: the counts flushed out of pending since then.
        self._seen: dict[str, dict[int, int]] = {phase: {} for phase in PER_SECOND_PHASES}
        self._carry: dict[str, dict[int, int]] = {phase: {} for phase in PER_SECOND_PHASES}

    def record(self, phase: str, seconds: float) -> int:
        """Count one latency; returns it as recorded, in whole microseconds."""
        us = int(seconds * 1_000_000 + 0.5)
        if us > HIGHEST_US:
            us = HIGHEST_US
        elif us < 0:
            us = 0
        pending = self._pending[phase]
        pending[us] = pending.get(us, 0) + 1
        if len(pending) > MAX_PENDING_VALUES:
            self._flush(phase)
        return us

    def take_recent(self, phase: str) -> dict[int, int]:
        """The latencies (us -> count) ``phase`` recorded since the previous call: one second
        of the run, for the report's latency over time. Costs a pass over the phase's pending
        counts, once a second; ``record`` is not slowed down."""
        recent = self._carry[phase]
        self._carry[phase] = {}
        seen = self._seen[phase]
        for us, count in self._pending[phase].items():
            new = count - seen.get(us, 0)
            if new:
                recent[us] = recent.get(us, 0) + new
        self._seen[phase] = dict(self._pending[phase])
        return recent

    def _flush(self, phase: str) -> None:
        pending = self._pending[phase]
        seen = self._seen.get(phase)
        if seen is not None:
            # Counts not yet taken by ``take_recent`` wait in the carry.
            carry = self._carry[phase]
            for us, count in pending.items():
                new = count - seen.get(us, 0)
                if new:
                    carry[us] = carry.get(us, 0) + new
            seen.clear()
        record = self._hists[phase].record_value
        for us, count in pending.items():
            record(us, count)
        pending.clear()

    @property
    def by_phase(self) -> dict[str, HdrHistogram]:
        """The histograms, with every recorded value in them."""
        for phase, pending in self._pending.items():
            if pending:
                self._flush(phase)
        return self._hists

    def merge(self, other: PhaseHistograms) -> None:
        mine = self.by_phase
        for phase, hist in other.by_phase.items():
            if hist.get_total_count():
                mine[phase].add(hist)

    def encode(self) -> dict[str, str]:
        """Non-empty histograms in HdrHistogram's compressed base64 form."""
        return {
            phase: hist.encode().decode("ascii")
            for phase, hist in self.by_phase.items()
            if hist.get_total_count()
        }

    @classmethod
    def decode(cls, encoded: dict[str, str]) -> PhaseHistograms:
        self = cls()
        for phase, text in encoded.items():
            self._hists[phase].add(HdrHistogram.decode(text.encode("ascii")))
        return self


def _significant(us: int) -> int:
    """``us`` as the middle of its bucket of ``_PER_SECOND_DIGITS`` significant digits."""
    digits = len(str(us))
    if digits <= _PER_SECOND_DIGITS:
        return us
    unit = 10 ** (digits - _PER_SECOND_DIGITS)
    return us - us % unit + unit // 2


def _pack(counts: dict[int, int]) -> array[int]:
    """value -> count as one flat array, ``[value, count, value, count, ...]`` by value: a
    tenth of a dict's memory, for an hour's worth of seconds."""
    flat: array[int] = array("q")
    for value in sorted(counts):
        flat.append(value)
        flat.append(counts[value])
    return flat


def unpack_counts(flat: array[int] | list[int]) -> dict[int, int]:
    """The value -> count of a packed second."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def counts_percentile(counts: dict[int, int], percentile: float) -> int:
    """The ``percentile`` of latencies given as value -> count (0 when there are none)."""
    total = sum(counts.values())
    if not total:
        return 0
    rank = max(1, math.ceil(percentile / 100 * total))
    running = 0
    for value in sorted(counts):
        running += counts[value]
        if running >= rank:
            return value
    return max(counts)


class Timeline:
    """Per-second counts since the start of the run: delivered messages, bytes, failures; and
    the latencies of ``PER_SECOND_PHASES`` per second (us, to 3 significant digits -> count),
    closed by ``close_second`` as the run goes."""

    __slots__ = ("bytes", "delivered", "failed", "latency")

    def __init__(self) -> None:
        self.delivered: list[int] = []
        self.bytes: list[int] = []
        self.failed: list[int] = []
        #: Per phase, per second: the latencies packed by ``_pack``.
        self.latency: dict[str, list[array[int]]] = {p: [] for p in PER_SECOND_PHASES}

    def close_second(self, phases: PhaseHistograms) -> None:
        """One more second of the run is over: keep its latencies."""
        for phase, seconds in self.latency.items():
            counts: dict[int, int] = {}
            for us, n in phases.take_recent(phase).items():
                key = _significant(us)
                counts[key] = counts.get(key, 0) + n
            seconds.append(_pack(counts))

    def latency_counts(self, phase: str, second: int) -> dict[int, int]:
        """The latencies (us -> count) of ``phase`` in ``second`` ({} if none were kept)."""
        seconds = self.latency.get(phase, [])
        return unpack_counts(seconds[second]) if second < len(seconds) else {}

    def _grow(self, second: int) -> None:
        missing = second + 1 - len(self.delivered)
        if missing > 0:
            self.delivered.extend([0] * missing)
            self.bytes.extend([0] * missing)
            self.failed.extend([0] * missing)

    def add_delivered(self, second: int, size: int) -> None:
        if second >= len(self.delivered):
            self._grow(second)
        self.delivered[second] += 1
        self.bytes[second] += size

    def add_failed(self, second: int) -> None:
        if second >= len(self.failed):
            self._grow(second)
        self.failed[second] += 1

    def merge(self, other: Timeline) -> None:
        for phase, seconds in other.latency.items():
            mine = self.latency.setdefault(phase, [])
            mine.extend(array("q") for _ in range(len(seconds) - len(mine)))
            for i, packed in enumerate(seconds):
                counts = unpack_counts(mine[i])
                for us, n in unpack_counts(packed).items():
                    counts[us] = counts.get(us, 0) + n
                mine[i] = _pack(counts)
        self._grow(len(other.delivered) - 1)
        for i, v in enumerate(other.delivered):
            self.delivered[i] += v
        for i, v in enumerate(other.bytes):
            self.bytes[i] += v
        for i, v in enumerate(other.failed):
            self.failed[i] += v

    def to_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "bytes": self.bytes,
            "failed": self.failed,
            "latency": {
                phase: [list(packed) for packed in seconds]
                for phase, seconds in self.latency.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timeline:
        self = cls()
        self.delivered = list(data["delivered"])
        self.bytes = list(data["bytes"])
        self.failed = list(data["failed"])
        for phase, seconds in data.get("latency", {}).items():
            self.latency[phase] = [array("q", flat) for flat in seconds]
        return self


@dataclass
class RunStats:
    """Everything one process (or, after ``merge``, a whole run) measured.

    ``started`` is the clock reading the run counts seconds from; ``elapsed`` is set at the end.
    Every message taken from the schedule is ``attempted`` and ends ``delivered`` or ``failed``.
    """

    started: float = 0.0
    #: Wall-clock time (UTC epoch seconds) at ``started``: where the run sits in real time,
    #: so ``mailstorm report merge`` can line up runs made on several machines.
    started_wall: float = 0.0
    #: Seconds from the start to the end of the last message: the window rates are taken over.
    elapsed: float = 0.0
    #: Seconds from the start until every session had quit.
    wall: float = 0.0
    #: Clock reading at the end of the latest message.
    last_message_at: float = 0.0
    attempted: int = 0
    delivered: int = 0
    failed: int = 0
    bytes_delivered: int = 0
    connections: int = 0
    phases: PhaseHistograms = field(default_factory=PhaseHistograms)
    timeline: Timeline = field(default_factory=Timeline)
    errors_by_kind: Counter[str] = field(default_factory=Counter)
    errors_by_code: Counter[int] = field(default_factory=Counter)
    #: A few distinct error texts with how often each happened.
    error_samples: Counter[str] = field(default_factory=Counter)
    #: Whole-message latencies (us -> count) since the last ``take_interval``: the live
    #: display's running p99.
    interval: dict[int, int] = field(default_factory=dict)
    #: How late this process's event loop woke up (ms, rounded up -> count), sampled every
    #: ``LOOP_LAG_PERIOD``: when it is large the generator itself was the bottleneck and its
    #: latencies include its own delay.
    loop_lag: Counter[int] = field(default_factory=Counter)
    #: CPU seconds (user + system) this process spent from the start to the end of the run,
    #: without the interpreter's start-up; summed over processes by ``merge``.
    cpu_s: float = 0.0
    #: Connections on which ``--pipeline-messages`` could not apply (no PIPELINING offered).
    unpipelined_connections: int = 0
    #: New connections made to carry on after the server ended one between messages, by
    #: reason: "421" (it said so), "closed" (it closed or reset the connection).
    reconnects: Counter[str] = field(default_factory=Counter)
    #: Back-offs after failed connections, and the seconds they added up to.
    backoffs: int = 0
    backoff_s: float = 0.0
    #: TLS handshakes by protocol version and cipher ("TLSv1.3 TLS_AES_256_GCM_SHA384").
    tls_ciphers: Counter[str] = field(default_factory=Counter)
    # ---- Prometheus metrics (issue 12) ----
    #: Session tasks running now (live only: not reported, not merged).
    sessions_open: int = 0

    # -- recording (hot path) --------------------------------------------------------------

    def message_delivered(self, now: float, latency: float, size: int) -> None:
        self.delivered += 1
        self.bytes_delivered += size
        self.last_message_at = now
        self.timeline.add_delivered(int(now - self.started), size)
        us = self.phases.record("message", latency)
        interval = self.interval
        interval[us] = interval.get(us, 0) + 1

    def close_second(self) -> None:
        """A second of the run is over (or the run is, for its last partial second): keep the
        latencies of ``PER_SECOND_PHASES`` recorded in it."""
        self.timeline.close_second(self.phases)

    def record_loop_lag(self, seconds: float) -> None:
        self.loop_lag[max(0, math.ceil(seconds * 1000))] += 1

    def loop_lag_ms(self, fraction: float) -> int:
        """The ``fraction`` quantile of the sampled loop lag, in whole milliseconds."""
        total = sum(self.loop_lag.values())
        if not total:
            return 0
        seen = 0
        for ms in sorted(self.loop_lag):
            seen += self.loop_lag[ms]
            if seen >= fraction * total:
                return ms
        return max(self.loop_lag)

    def message_failed(self, now: float) -> None:
        self.failed += 1
        self.last_message_at = now
        self.timeline.add_failed(int(now - self.started))

    def error(self, kind: str, detail: str, code: int | None = None) -> None:
        self.errors_by_kind[kind] += 1
        if code is not None:
            self.errors_by_code[code] += 1
        samples = self.error_samples
        if detail in samples or len(samples) < MAX_ERROR_SAMPLES:
            samples[detail] += 1

    def reply_error(self, phase: str, code: int, text: str) -> None:
        """A reply the plan did not want: a 4xx or 5xx, or a wrong positive code."""
        kind = "4xx" if 400 <= code < 500 else "5xx" if code >= 500 else "protocol"
        self.error(kind, f"{phase}: {code} {text}", code)

    # -- reading ---------------------------------------------------------------------------

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())

    @property
    def msg_rate(self) -> float:
        """Delivered messages per second over the measurement window."""
        return self.delivered / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def byte_rate(self) -> float:
        return self.bytes_delivered / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def error_rate(self) -> float:
        """Failed messages per attempted message."""
        return self.failed / self.attempted if self.attempted else 0.0

    def take_interval(self) -> HdrHistogram:
        """Message latencies since the previous call, as a histogram."""
        hist = new_histogram()
        for us, count in self.interval.items():
            hist.record_value(min(max(us, 0), HIGHEST_US), count)
        self.interval = {}
        return hist

    # -- merging across processes ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A picklable, JSON-able form that ``from_dict`` restores exactly."""
        return {
            "started_wall": self.started_wall,
            "elapsed": self.elapsed,
            "wall": self.wall,
            "attempted": self.attempted,
            "delivered": self.delivered,
            "failed": self.failed,
            "bytes_delivered": self.bytes_delivered,
            "connections": self.connections,
            "phases": self.phases.encode(),
            "timeline": self.timeline.to_dict(),
            "errors_by_kind": dict(self.errors_by_kind),
            "errors_by_code": {str(k): v for k, v in self.errors_by_code.items()},
            "error_samples": dict(self.error_samples),
            "loop_lag": {str(k): v for k, v in self.loop_lag.items()},
            "cpu_s": self.cpu_s,
            "unpipelined_connections": self.unpipelined_connections,
            "reconnects": dict(self.reconnects),
            "backoffs": self.backoffs,
            "backoff_s": self.backoff_s,
            "tls_ciphers": dict(self.tls_ciphers),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunStats:
        return cls(
            started_wall=data.get("started_wall", 0.0),
            elapsed=data["elapsed"],
            wall=data["wall"],
            attempted=data["attempted"],
            delivered=data["delivered"],
            failed=data["failed"],
            bytes_delivered=data["bytes_delivered"],
            connections=data["connections"],
            phases=PhaseHistograms.decode(data["phases"]),
            timeline=Timeline.from_dict(data["timeline"]),
            errors_by_kind=Counter(data["errors_by_kind"]),
            errors_by_code=Counter({int(k): v for k, v in data["errors_by_code"].items()}),
            error_samples=Counter(data["error_samples"]),
            loop_lag=Counter({int(k): v for k, v in data.get("loop_lag", {}).items()}),
            cpu_s=data.get("cpu_s", 0.0),
            unpipelined_connections=data.get("unpipelined_connections", 0),
            reconnects=Counter(data.get("reconnects", {})),
            backoffs=data.get("backoffs", 0),
            backoff_s=data.get("backoff_s", 0.0),
            tls_ciphers=Counter(data.get("tls_ciphers", {})),
        )

    def merge(self, other: RunStats) -> None:
        """Add another process's results. The run lasted as long as its longest process."""
        if other.started_wall and not 0 < self.started_wall <= other.started_wall:
            self.started_wall = other.started_wall  # the earliest process's start
        self.elapsed = max(self.elapsed, other.elapsed)
        self.wall = max(self.wall, other.wall)
        self.attempted += other.attempted
        self.delivered += other.delivered
        self.failed += other.failed
        self.bytes_delivered += other.bytes_delivered
        self.connections += other.connections
        self.phases.merge(other.phases)
        self.timeline.merge(other.timeline)
        self.errors_by_kind.update(other.errors_by_kind)
        self.errors_by_code.update(other.errors_by_code)
        self.loop_lag.update(other.loop_lag)
        self.cpu_s += other.cpu_s
        self.unpipelined_connections += other.unpipelined_connections
        self.reconnects.update(other.reconnects)
        self.backoffs += other.backoffs
        self.backoff_s += other.backoff_s
        self.tls_ciphers.update(other.tls_ciphers)
        for detail, count in other.error_samples.items():
            if detail in self.error_samples or len(self.error_samples) < MAX_ERROR_SAMPLES:
                self.error_samples[detail] += count
