"""The sink's Prometheus metrics (``mailstorm sink --metrics-listen HOST:PORT``).

Nothing is counted here: the sessions count into ``SinkStats`` as they always do (plain
integer increments), and ``SinkCollector`` turns a snapshot of those counters into metric
families only when Prometheus scrapes. The hot path thus pays nothing for metrics, and a sink
under ``--workers`` exports the supervisor's sums in the same way (one scrape, one truth).

``_KNOWN`` names each snapshot key that has a metric of its own; every other numeric key
(a counter someone adds to ``SinkStats`` later) is exported as ``mailstorm_sink_<key>``,
untyped, so no counter is left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from .stats import (
    CLIENT_KEY_PREFIX,
    FAULT_KEY_PREFIX,
    REFUSED_KEY_PREFIX,
    REPLY_KEY_PREFIX,
    STORE_KEY_PREFIX,
)

__all__ = ["SinkCollector", "sink_registry"]

PREFIX = "mailstorm_sink_"

Snapshot = Mapping[str, float]


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    help: str
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily]
    labels: tuple[str, ...] = ()


_SESSIONS_OPEN = _Family("sessions_open", "SMTP sessions open now", GaugeMetricFamily)
_SESSIONS = _Family("sessions", "SMTP sessions accepted", CounterMetricFamily)
_SESSIONS_REFUSED = _Family(
    "sessions_refused",
    "connections refused with 421 (over --max-connections or --max-connections-per-ip)",
    CounterMetricFamily,
    ("limit",),
)
_STORED = _Family("messages_stored", "messages stored (answered 250)", CounterMetricFamily)
_RECEIVED = _Family(
    "messages_received", "complete messages received: stored plus refused", CounterMetricFamily
)
_REFUSED = _Family(
    "messages_refused",
    "complete messages refused, by reason (too_big, bare_linefeed, fault, storage_failure)",
    CounterMetricFamily,
    ("reason",),
)
_BYTES = _Family(
    "message_bytes", "octets of message content stored (before trace headers)",
    CounterMetricFamily,
)
_RECIPIENTS = _Family("recipients", "recipients of stored messages", CounterMetricFamily)
_REPLIES = _Family("replies", "SMTP replies given, by code", CounterMetricFamily, ("code",))
_TLS = _Family(
    "tls_handshakes", "TLS handshakes (implicit TLS and STARTTLS), by result",
    CounterMetricFamily, ("result",),
)
_AUTH = _Family(
    "auth_attempts", "AUTH attempts checked, by result", CounterMetricFamily, ("result",)
)
_FAULTS = _Family(
    "faults_injected",
    "injected faults (--fault, --delay, --drop, magic addresses), by point and kind "
    "(a reply code, delay or drop)",
    CounterMetricFamily,
    ("point", "kind"),
)
_PROXY = _Family(
    "proxy_headers",
    "PROXY protocol headers (--proxy-protocol), by result: accepted, or the reason the "
    "connection was closed (untrusted, malformed, truncated, oversize, timeout)",
    CounterMetricFamily,
    ("result",),
)
_LMTP_RECIPIENTS = _Family(
    "lmtp_recipients",
    "LMTP (--lmtp) recipients answered at the end of data, by result (delivered, refused)",
    CounterMetricFamily,
    ("result",),
)
_CLIENTS = _Family(
    "client_sessions",
    "sessions by client address (the real client, after any PROXY header); the first 100 "
    "addresses a sink process sees are labels of their own, the rest count as 'other'",
    CounterMetricFamily,
    ("client",),
)
_UPTIME = _Family("uptime_seconds", "seconds since the sink started", GaugeMetricFamily)
_WORKERS = _Family("workers", "sink worker processes (--workers)", GaugeMetricFamily)
_RESTARTS = _Family(
    "worker_restarts", "worker processes restarted after a crash", CounterMetricFamily
)

#: Snapshot keys with a metric of their own: the family, and the label values of the key.
_KNOWN: dict[str, tuple[_Family, tuple[str, ...]]] = {
    "sessions_active": (_SESSIONS_OPEN, ()),
    "sessions_total": (_SESSIONS, ()),
    "messages": (_STORED, ()),
    "bytes": (_BYTES, ()),
    "recipients": (_RECIPIENTS, ()),
    "tls_sessions": (_TLS, ("ok",)),
    "tls_failures": (_TLS, ("failed",)),
    "auth_successes": (_AUTH, ("ok",)),
    "auth_failures": (_AUTH, ("failed",)),
    "uptime": (_UPTIME, ()),
    "workers": (_WORKERS, ()),
    "worker_restarts": (_RESTARTS, ()),
    "proxy_accepted": (_PROXY, ("accepted",)),
    "proxy_refused_untrusted": (_PROXY, ("untrusted",)),
    "proxy_refused_malformed": (_PROXY, ("malformed",)),
    "proxy_refused_truncated": (_PROXY, ("truncated",)),
    "proxy_refused_oversize": (_PROXY, ("oversize",)),
    "proxy_refused_timeout": (_PROXY, ("timeout",)),
    "lmtp_recipients_delivered": (_LMTP_RECIPIENTS, ("delivered",)),
    "lmtp_recipients_refused": (_LMTP_RECIPIENTS, ("refused",)),
}
#: Keys given in another form: ``messages_refused`` and ``storage_failures`` are the sum and
#: a part of ``refused.*``; ``sessions_refused`` is split by limit; ``faults_*`` are the sums
#: of ``faults.*`` by kind; ``pid`` is a worker's report.
_DERIVED = {
    "messages_refused",
    "storage_failures",
    "sessions_refused",
    "sessions_refused_per_ip",
    "faults_replied",
    "faults_delayed",
    "faults_dropped",
    "pid",
}
_FIXED_FAMILIES = (
    _SESSIONS_OPEN, _SESSIONS, _SESSIONS_REFUSED, _RECEIVED, _STORED, _REFUSED, _BYTES,
    _RECIPIENTS, _REPLIES, _TLS, _AUTH, _FAULTS, _UPTIME,
)
_NOT_A_NAME = re.compile(r"[^a-zA-Z0-9_]")


class SinkCollector(Collector):
    """Metric families from the snapshot that ``source`` returns at each scrape
    (``SinkStats.snapshot``, or the supervisor's sums over its workers)."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snapshot = self.source()
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}

        def add(family: _Family, labels: tuple[str, ...], value: float) -> None:
            metric = families.get(family.name)
            if metric is None:
                metric = families[family.name] = family.kind(
                    PREFIX + family.name, family.help, labels=family.labels
                )
            metric.add_metric(list(labels), value)

        for family in _FIXED_FAMILIES:
            families[family.name] = family.kind(
                PREFIX + family.name, family.help, labels=family.labels
            )
        refused_total = snapshot.get("sessions_refused", 0)
        per_ip = snapshot.get("sessions_refused_per_ip", 0)
        add(_SESSIONS_REFUSED, ("max_connections",), refused_total - per_ip)
        add(_SESSIONS_REFUSED, ("max_connections_per_ip",), per_ip)
        add(_RECEIVED, (), snapshot.get("messages", 0) + snapshot.get("messages_refused", 0))
        store_buckets: list[tuple[str, float]] = []
        store_count = store_sum = 0.0
        generic: list[Metric] = []
        for key, value in snapshot.items():
            if not isinstance(value, int | float) or key in _DERIVED:
                continue
            known = _KNOWN.get(key)
            if known is not None:
                add(*known, value)
            elif key.startswith(REPLY_KEY_PREFIX):
                add(_REPLIES, (key.removeprefix(REPLY_KEY_PREFIX),), value)
            elif key.startswith(CLIENT_KEY_PREFIX):
                add(_CLIENTS, (key.removeprefix(CLIENT_KEY_PREFIX),), value)
            elif key.startswith(REFUSED_KEY_PREFIX):
                add(_REFUSED, (key.removeprefix(REFUSED_KEY_PREFIX),), value)
            elif key.startswith(FAULT_KEY_PREFIX):
                point, _, kind = key.removeprefix(FAULT_KEY_PREFIX).partition(".")
                add(_FAULTS, (point, kind), value)
            elif key.startswith(STORE_KEY_PREFIX):
                part = key.removeprefix(STORE_KEY_PREFIX)
                if part.startswith("le."):
                    store_buckets.append((part.removeprefix("le."), value))
                elif part == "count":
                    store_count = value
                elif part == "sum":
                    store_sum = value
            else:
                metric = UnknownMetricFamily(
                    PREFIX + _NOT_A_NAME.sub("_", key), f"sink counter {key!r}"
                )
                metric.add_metric([], value)
                generic.append(metric)
        store_buckets.sort(key=lambda bucket: float(bucket[0]))
        yield from families.values()
        yield HistogramMetricFamily(
            PREFIX + "store_seconds",
            "time to store a message (stores that wait: maildir, mbox)",
            buckets=[*store_buckets, ("+Inf", store_count)],
            sum_value=store_sum,
        )
        yield from generic


def sink_registry(source: Callable[[], Snapshot]) -> CollectorRegistry:
    """A registry of its own (not prometheus-client's global one) holding only the sink's
    collector: no process or Python metrics of whichever process happens to serve."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SinkCollector(source))
    return registry
