"""``mailstorm sink --metrics-listen``: a real sink process, real SMTP clients, a real scrape
parsed with prometheus-client's own parser, and exact counts."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import wait_for_output
from prometheus_client.parser import text_string_to_metric_families

from mailstorm.sink import SinkThread
from mailstorm.sink.metrics import sink_registry
from mailstorm.sink.stats import MAX_CLIENT_LABELS, SinkStats

PROCESS_TIMEOUT = 30.0
BODY = "Subject: metrics\r\n\r\nhello\r\n"


@contextmanager
def _sink(tmp_path: Path, *args: str) -> Iterator[tuple[int, int, Path]]:
    """A sink process; yields its SMTP port, its metrics port and its log."""
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        sink = subprocess.Popen(
            [sys.executable, "-m", "mailstorm.sink", "--listen", "127.0.0.1:0",
             "--metrics-listen", "127.0.0.1:0", *args],
            stderr=stderr, start_new_session=True,
        )
    try:
        smtp_port = int(wait_for_output(log, r"listening on 127\.0\.0\.1:(\d+)").group(1))
        metrics_port = int(wait_for_output(log, r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1))
        yield smtp_port, metrics_port, log
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(timeout=PROCESS_TIMEOUT) == 0
    finally:
        if sink.poll() is None:
            os.killpg(sink.pid, signal.SIGKILL)
            sink.wait()




def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` parsed: sample name -> {sorted labels: value}; checks each family's type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("mailstorm_sink_")
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def types(port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def scrape_until(port: int, name: str, value: float) -> dict:
    """Scrape until the unlabelled ``name`` is ``value`` (counters travel asynchronously)."""
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while True:
        samples = scrape(port)
        if samples.get(name, {}).get(()) == value:
            return samples
        assert time.monotonic() < deadline, f"{name} never reached {value}: {samples.get(name)}"
        time.sleep(0.1)


def send(port: int, rcpt: str) -> int | None:
    """One message on its own connection; the refusal code, or None when it was accepted."""
    with smtplib.SMTP("127.0.0.1", port, timeout=PROCESS_TIMEOUT) as client:
        try:
            client.sendmail("a@example.com", [rcpt], BODY)
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients[rcpt][0]
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code
    return None


FAULTS = ("--fault", "EOD to=later@*:452", "--fault", "RCPT to=nobody@*:550")


def _send_the_mix(port: int) -> None:
    """5 stored, 2 refused at the end of data, 1 recipient refused: 8 sessions."""
    assert [send(port, "ok@example.com") for _ in range(5)] == [None] * 5
    assert [send(port, "later@example.com") for _ in range(2)] == [452, 452]
    assert send(port, "nobody@example.com") == 550


def _check_the_mix(m: dict, *, stored_to_maildir: bool) -> None:
    assert m["mailstorm_sink_sessions_total"][()] == 8
    assert m["mailstorm_sink_client_sessions_total"] == {(("client", "127.0.0.1"),): 8}
    assert m["mailstorm_sink_sessions_open"][()] == 0
    assert m["mailstorm_sink_messages_stored_total"][()] == 5
    assert m["mailstorm_sink_messages_received_total"][()] == 7
    assert m["mailstorm_sink_messages_refused_total"] == {(("reason", "fault"),): 2}
    assert m["mailstorm_sink_recipients_total"][()] == 5
    assert m["mailstorm_sink_message_bytes_total"][()] == 5 * len(BODY)
    replies = {labels[0][1]: n for labels, n in m["mailstorm_sink_replies_total"].items()}
    # Per session: 220, EHLO 250, MAIL 250, QUIT 221; stored ones RCPT 250, 354 and EOD 250;
    # refused at EOD: RCPT 250, 354, 452 and smtplib's RSET 250; refused RCPT: 550 and RSET 250.
    assert replies == {"220": 8, "250": 5 * 4 + 2 * 4 + 1 * 3, "354": 7, "452": 2, "550": 1,
                       "221": 8}
    assert m["mailstorm_sink_faults_injected_total"] == {
        (("kind", "452"), ("point", "EOD")): 2,
        (("kind", "550"), ("point", "RCPT")): 1,
    }
    assert m["mailstorm_sink_sessions_refused_total"] == {
        (("limit", "max_connections"),): 0, (("limit", "max_connections_per_ip"),): 0}
    assert m["mailstorm_sink_auth_attempts_total"] == {
        (("result", "failed"),): 0, (("result", "ok"),): 0}
    buckets = m["mailstorm_sink_store_seconds_bucket"]
    stored = 5 if stored_to_maildir else 0
    assert buckets[(("le", "+Inf"),)] == stored
    assert m["mailstorm_sink_store_seconds_count"][()] == stored
    values = [n for _, n in sorted(buckets.items(), key=lambda kv: float(kv[0][0][1]))]
    assert values == sorted(values), "histogram buckets are cumulative"


def test_one_sink_counts_exactly_what_was_sent(tmp_path: Path) -> None:
    with _sink(tmp_path, "--store", f"maildir:{tmp_path / 'mail'}", *FAULTS) as (port, mport, _):
        _send_the_mix(port)
        m = scrape_until(mport, "mailstorm_sink_sessions_open", 0)
        _check_the_mix(m, stored_to_maildir=True)
        assert m["mailstorm_sink_store_seconds_sum"][()] > 0
        kinds = types(mport)
        assert kinds["mailstorm_sink_store_seconds"] == "histogram"
        assert kinds["mailstorm_sink_replies"] == "counter"
        assert kinds["mailstorm_sink_sessions_open"] == "gauge"


def test_tls_and_auth_are_counted_by_result(tmp_path: Path, tls_files, auth_file) -> None:
    with _sink(tmp_path, "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key),
               "--auth-file", str(auth_file)) as (port, mport, _):
        with smtplib.SMTP("127.0.0.1", port, timeout=PROCESS_TIMEOUT) as client:
            client.starttls(context=tls_files.client_context())
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("alice", "wrong")
            client.login("alice", "wonderland")
        with socket.create_connection(("127.0.0.1", port), timeout=PROCESS_TIMEOUT) as raw:
            raw.recv(1000)
            raw.sendall(b"STARTTLS\r\n")
            assert raw.recv(1000).startswith(b"220 ")
            raw.sendall(b"not a TLS hello\r\n" * 10)  # the handshake fails
            raw.recv(1000)
        m = scrape_until(mport, "mailstorm_sink_sessions_open", 0)
        assert m["mailstorm_sink_tls_handshakes_total"] == {
            (("result", "failed"),): 1, (("result", "ok"),): 1}
        # smtplib tries each offered mechanism (PLAIN, then LOGIN) before it gives up.
        assert m["mailstorm_sink_auth_attempts_total"] == {
            (("result", "failed"),): 2, (("result", "ok"),): 1}
        replies = {labels[0][1]: n for labels, n in m["mailstorm_sink_replies_total"].items()}
        assert replies["235"] == 1 and replies["535"] == 2


def test_the_endpoint_bounds_what_a_scraper_sends(tmp_path: Path) -> None:
    with _sink(tmp_path) as (_, mport, _):
        with socket.create_connection(("127.0.0.1", mport), timeout=10) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 431 ")
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/other", timeout=10)
        assert raised.value.code == 404
        request = urllib.request.Request(f"http://127.0.0.1:{mport}/metrics", method="POST")
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=10)
        assert raised.value.code == 405
        assert scrape(mport)["mailstorm_sink_sessions_total"][()] == 0


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_workers_serve_one_scrape_with_the_sums(tmp_path: Path) -> None:
    maildir = f"maildir:{tmp_path / 'mail'}"
    with _sink(tmp_path, "--workers", "2", "--store", maildir, *FAULTS) as (port, mport, log):
        _send_the_mix(port)
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while True:  # the workers report every half second: wait for the last of it
            m = scrape(mport)
            if m["mailstorm_sink_sessions_total"][()] == 8 and not (
                m["mailstorm_sink_sessions_open"][()]
            ):
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.1)
        _check_the_mix(m, stored_to_maildir=True)  # the store histograms summed too
        assert m["mailstorm_sink_workers"][()] == 2
        assert m["mailstorm_sink_worker_restarts_total"][()] == 0
        # Only the supervisor serves metrics (the workers were not given --metrics-listen).
        assert log.read_text().count("metrics at ") == 1


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailstorm", "sink", "--listen", "127.0.0.1:0", *args],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
    )


@pytest.mark.parametrize("value", ["nonsense", "127.0.0.1:99999", ":9100", "[::1"])
def test_a_bad_metrics_address_is_one_line(value: str) -> None:
    result = _run("--metrics-listen", value)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "--metrics-listen" in result.stderr and "bad metrics address" in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_metrics_port_in_use_is_one_line(workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("--metrics-listen", f"127.0.0.1:{port}", "--workers", workers)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"mailstorm sink: error: cannot serve metrics on 127.0.0.1:{port}: address already in use"
    ], result.stderr


def test_counters_the_exporter_does_not_know_are_exported_under_their_own_name() -> None:
    """A counter someone adds to SinkStats later (PROXY refusals, LMTP...) is not left out."""
    from prometheus_client import generate_latest

    from mailstorm.sink.metrics import sink_registry
    from mailstorm.sink.stats import SinkStats

    stats = SinkStats()
    snapshot = {**stats.snapshot(), "proxy_headers_refused": 3, "lmtp.rcpt-replies": 2}
    text = generate_latest(sink_registry(lambda: snapshot)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["mailstorm_sink_proxy_headers_refused"].samples[0].value == 3
    assert families["mailstorm_sink_lmtp_rcpt_replies"].type == "unknown"
    assert families["mailstorm_sink_lmtp_rcpt_replies"].samples[0].value == 2


def test_an_embedded_sink_serves_metrics_from_an_address_string() -> None:
    """``SinkThread(metrics_listen="HOST:PORT")``: the same endpoint for a test's own sink."""
    with SinkThread(metrics_listen="127.0.0.1:0") as sink:
        url = sink.metrics_url
        assert url is not None and url.startswith("http://127.0.0.1:")
        with smtplib.SMTP(sink.host, sink.port, timeout=PROCESS_TIMEOUT) as client:
            client.sendmail("a@example.test", ["b@example.test"], BODY)
        samples = scrape(int(url.rsplit(":", 1)[1].split("/")[0]))
    assert samples["mailstorm_sink_messages_received_total"][()] == 1


def _until_closed(sock: socket.socket) -> bytes:
    received = b""
    while data := sock.recv(65536):
        received += data
    return received


def test_proxy_headers_and_lmtp_recipients_are_counted(tmp_path: Path) -> None:
    """A proxied LMTP transaction (two recipients delivered, one refused at the end of data)
    and a malformed PROXY header, each under its own labelled counter."""
    with _sink(tmp_path, "--lmtp", "--proxy-protocol", "--fault", "EOD to=full@*:452") as (
        port, mport, _
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=PROCESS_TIMEOUT) as sock:
            sock.sendall(
                b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 24\r\nLHLO client.test\r\n"
                b"MAIL FROM:<a@example.com>\r\nRCPT TO:<ok1@example.com>\r\n"
                b"RCPT TO:<ok2@example.com>\r\nRCPT TO:<full@example.com>\r\nDATA\r\n"
            )
            received = b""
            while b"\r\n354 " not in received:
                received += sock.recv(65536)
            sock.sendall(BODY.encode() + b".\r\nQUIT\r\n")
            replies = _until_closed(sock)
        assert replies.count(b"\r\n250 ") + replies.startswith(b"250 ") == 2
        assert b"452 " in replies
        with socket.create_connection(("127.0.0.1", port), timeout=PROCESS_TIMEOUT) as sock:
            sock.sendall(b"PROXY NONSENSE\r\n")
            assert _until_closed(sock) == b""  # no banner
        m = scrape_until(mport, "mailstorm_sink_sessions_open", 0)
    results = {labels[0][1]: n for labels, n in m["mailstorm_sink_proxy_headers_total"].items()}
    assert results["accepted"] == 1 and results["malformed"] == 1
    assert sum(results.values()) == 2
    # The proxied session counts under the header's client; the refused one under nobody.
    assert m["mailstorm_sink_client_sessions_total"] == {(("client", "192.0.2.7"),): 1}
    assert m["mailstorm_sink_lmtp_recipients_total"] == {
        (("result", "delivered"),): 2, (("result", "refused"),): 1}
    assert m["mailstorm_sink_messages_stored_total"][()] == 1


def test_sessions_by_client_keep_a_bounded_label_set() -> None:
    """Past ``MAX_CLIENT_LABELS`` addresses, new ones count as "other": a sweep from a whole
    network cannot grow the metrics without bound."""
    stats = SinkStats()
    for i in range(MAX_CLIENT_LABELS + 50):
        stats.count_client(f"10.0.{i // 256}.{i % 256}")
    stats.count_client("10.0.0.0")  # a known address keeps its own label
    families = {f.name: f for f in sink_registry(stats.snapshot).collect()}
    samples = families["mailstorm_sink_client_sessions"].samples
    assert len(samples) == MAX_CLIENT_LABELS + 1
    by_client = {s.labels["client"]: s.value for s in samples}
    assert by_client["other"] == 50 and by_client["10.0.0.0"] == 2
