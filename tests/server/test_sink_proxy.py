"""The sink with ``--proxy-protocol``: real sockets send v1/v2 headers, then SMTP; the stored
message names the header's client. Bad, truncated, oversize, late and untrusted headers get
the connection closed without a banner, and are counted by reason."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import TEST_TIMEOUT, SinkFactory, SMTPClient, TLSFiles, wait_for_output

from mailstorm.errors import ConfigError
from mailstorm.sink import Address, SinkConfig, SinkServer, read_maildir
from mailstorm.sink.cli import main as sink_main
from mailstorm.sink.eventlog import EVENTS_LOGGER
from mailstorm.sink.proxy import DEFAULT_PROXY_TIMEOUT, ProxyPolicy, parse_network
from mailstorm.wire.proxy import MAX_HEADER_SIZE, V2_SIGNATURE

V1_CLIENT = b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 25\r\n"
V1_CLIENT6 = b"PROXY TCP6 2001:db8::7 ::1 40001 25\r\n"


def v2_header(src: str, dst: str, sport: int, dport: int, command: int = 1) -> bytes:
    family = 0x11 if ipaddress.ip_address(src).version == 4 else 0x21
    body = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    body += struct.pack("!HH", sport, dport) + b"\x04\x00\x03abc"  # and a TLV (NOOP)
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


async def proxy_sink(start_sink: SinkFactory, maildir: Path, **overrides: object) -> SinkServer:
    return await start_sink(proxy_protocol=True, store=f"maildir:{maildir}", **overrides)


async def transaction(client: SMTPClient, *, banner: bool = True) -> None:
    if banner:
        assert (await client.reply()).code == 220
    for line, code in [
        ("EHLO client.test", 250),
        ("MAIL FROM:<a@example.test>", 250),
        ("RCPT TO:<b@example.test>", 250),
        ("DATA", 354),
    ]:
        reply = await client.cmd(line)
        assert reply.code == code, (line, reply)
    assert (await client.cmd("Subject: hi\r\n\r\nbody\r\n.")).code == 250
    assert (await client.cmd("QUIT")).code == 221


async def everything_until_closed(client: SMTPClient) -> bytes:
    """All the server sends before it closes (a reset counts as closed)."""
    received = b""
    with trio.fail_after(TEST_TIMEOUT):
        while True:
            try:
                data = await client.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return received
            if not data:
                return received
            received += data


@pytest.mark.parametrize(
    ("header", "client_ip"),
    [
        (V1_CLIENT, "192.0.2.7"),
        (V1_CLIENT6, "2001:db8::7"),
        (v2_header("192.0.2.9", "127.0.0.1", 40002, 25), "192.0.2.9"),
        (v2_header("2001:db8::9", "::1", 40002, 25), "2001:db8::9"),
        (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
        (v2_header("192.0.2.9", "127.0.0.1", 1, 2, command=0), "127.0.0.1"),  # LOCAL
    ],
)
async def test_the_headers_client_is_recorded(
    start_sink: SinkFactory, tmp_path: Path, header: bytes, client_ip: str
) -> None:
    server = await proxy_sink(start_sink, tmp_path)
    client = await SMTPClient.connect(server.addresses[0])
    try:
        await client.send(header)
        await transaction(client)
    finally:
        await client.aclose()
    [record] = read_maildir(tmp_path)
    assert record.client_address == client_ip
    assert server.stats.proxy_accepted == 1
    assert server.stats.proxy_refused() == 0


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1)")
async def test_ipv6_loopback_proxy_is_trusted_by_default(
    start_sink: SinkFactory, tmp_path: Path
) -> None:
    server = await proxy_sink(start_sink, tmp_path, listen=(Address("::1", 0),))
    client = await SMTPClient.connect(server.addresses[0])
    try:
        await client.send(V1_CLIENT)
        await transaction(client)
    finally:
        await client.aclose()
    [record] = read_maildir(tmp_path)
    assert record.client_address == "192.0.2.7"


async def test_header_and_first_command_in_one_write(
    start_sink: SinkFactory, tmp_path: Path
) -> None:
    # The banner still comes first; the command that came with the header is answered after.
    server = await proxy_sink(start_sink, tmp_path)
    client = await SMTPClient.connect(server.addresses[0])
    try:
        await client.send(V1_CLIENT + b"EHLO early.test\r\nNOOP\r\n")
        banner, ehlo, noop = await client.replies(3)
        assert (banner.code, ehlo.code, noop.code) == (220, 250, 250)
        await transaction(client, banner=False)
    finally:
        await client.aclose()
    [record] = read_maildir(tmp_path)
    assert record.client_address == "192.0.2.7"


@pytest.mark.parametrize(
    ("data", "counter"),
    [
        (b"EHLO client.test\r\n", "proxy_refused_malformed"),  # no header at all
        (b"PROXY TCP4 192.0.2.400 127.0.0.1 1 2\r\n", "proxy_refused_malformed"),
        (b"PROXY TCP4 192.0.2.7 127.0.0.1 1 2\n", "proxy_refused_malformed"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\0" * 12, "proxy_refused_malformed"),
        (b"PROXY UNKNOWN " + b"x" * 200, "proxy_refused_oversize"),
        (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_HEADER_SIZE), "proxy_refused_oversize"),
        (V1_CLIENT[:20], "proxy_refused_truncated"),
        (v2_header("192.0.2.9", "127.0.0.1", 1, 2)[:20], "proxy_refused_truncated"),
    ],
)
async def test_bad_headers_are_closed_without_a_banner(
    start_sink: SinkFactory, tmp_path: Path, data: bytes, counter: str
) -> None:
    server = await proxy_sink(start_sink, tmp_path)
    client = await SMTPClient.connect(server.addresses[0])
    try:
        await client.send(data)
        if counter == "proxy_refused_truncated":
            await client.stream.send_eof()  # type: ignore[attr-defined]
        assert await everything_until_closed(client) == b""
    finally:
        await client.aclose()
    assert server.stats.snapshot()[counter] == 1
    assert server.stats.proxy_refused() == 1
    assert server.stats.proxy_accepted == 0
    assert "PROXY refused 1" in server.stats.interval_line()


async def test_a_slow_header_times_out(start_sink: SinkFactory, tmp_path: Path) -> None:
    server = await proxy_sink(start_sink, tmp_path, proxy_timeout=0.2)
    client = await SMTPClient.connect(server.addresses[0])
    try:
        await client.send(V1_CLIENT[:10])  # and nothing more
        assert await everything_until_closed(client) == b""
    finally:
        await client.aclose()
    assert server.stats.proxy_refused_timeout == 1


async def test_untrusted_sources_are_closed_without_reading(
    start_sink: SinkFactory, tmp_path: Path
) -> None:
    server = await proxy_sink(start_sink, tmp_path, proxy_from=("10.0.0.0/8",))
    client = await SMTPClient.connect(server.addresses[0])
    try:
        await client.send(V1_CLIENT)
        assert await everything_until_closed(client) == b""
    finally:
        await client.aclose()
    assert server.stats.proxy_refused_untrusted == 1
    assert server.stats.proxy_accepted == 0


async def test_a_stop_drops_connections_still_waiting_for_their_header(
    start_sink: SinkFactory, tmp_path: Path
) -> None:
    # Not a session yet: no banner, no 421, and no waiting for --proxy-timeout.
    server = await proxy_sink(start_sink, tmp_path, proxy_timeout=3600)
    client = await SMTPClient.connect(server.addresses[0])
    try:
        await client.send(V1_CLIENT[:10])
        await trio.testing.wait_all_tasks_blocked()
        server.shutdown()
        assert await everything_until_closed(client) == b""
    finally:
        await client.aclose()
    assert server.stats.proxy_refused() == 0


class PrefixedFirstSend(trio.abc.Stream):
    """A client stream whose first write carries ``prefix`` too: a proxy that sends the
    header and the client's first bytes (here a TLS ClientHello) in one segment."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream, self.prefix = stream, prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        prefix, self.prefix = self.prefix, b""
        await self.stream.send_all(prefix + bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_implicit_tls_header_and_client_hello_in_one_write(
    start_sink: SinkFactory, tmp_path: Path, tls_files: TLSFiles
) -> None:
    server = await proxy_sink(
        start_sink,
        tmp_path,
        listen=(),
        tls_listen=(Address("127.0.0.1", 0),),
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
    )
    with trio.fail_after(TEST_TIMEOUT):
        tcp = await trio.open_tcp_stream(*server.tls_addresses[0])
    tls = trio.SSLStream(
        PrefixedFirstSend(tcp, v2_header("192.0.2.9", "127.0.0.1", 1, 465)),
        tls_files.client_context(),
        server_hostname="localhost",
    )
    client = SMTPClient(tls)
    try:
        await transaction(client)
    finally:
        await client.aclose()
    [record] = read_maildir(tmp_path)
    assert record.client_address == "192.0.2.9"
    assert record.tls


# ---- configuration -----------------------------------------------------------------------


def test_trust_covers_ipv4_mapped_and_cidr_blocks() -> None:
    policy = ProxyPolicy((parse_network("127.0.0.0/8"), parse_network("2001:db8::/32")))
    assert policy.trusts("127.0.0.2")
    assert policy.trusts("::ffff:127.0.0.1")
    assert policy.trusts("2001:db8::1")
    assert not policy.trusts("192.0.2.1")
    assert not policy.trusts("::1")
    assert not policy.trusts("unknown")


def test_config_defaults_agree() -> None:
    assert SinkConfig().proxy_timeout == DEFAULT_PROXY_TIMEOUT
    assert not SinkConfig().proxy_protocol


def test_proxy_from_without_proxy_protocol_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--proxy-from needs --proxy-protocol"):
        SinkServer.from_config(SinkConfig(proxy_from=("10.0.0.0/8",)))


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sink_main(["--proxy-protocol", "--proxy-from", "nonsense"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bad network 'nonsense'" in err and err.count("\n") == 1
    assert sink_main(["--proxy-from", "10.0.0.0/8"]) == 2
    err = capsys.readouterr().err
    assert "--proxy-from needs --proxy-protocol" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        sink_main(["--proxy-protocol", "--proxy-timeout", "0"])
    assert exit_info.value.code == 2


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_workers_sum_the_proxy_counters(tmp_path: Path) -> None:
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        sink = subprocess.Popen(
            [
                sys.executable, "-m", "mailstorm", "sink", "--workers", "2",
                "--listen", "127.0.0.1:0", "--stats-interval", "0.2",
                "--proxy-protocol", "--proxy-from", "10.0.0.0/8",
            ],
            stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
    try:
        port = int(wait_for_output(log, r"listening on 127\.0\.0\.1:(\d+)").group(1))
        wait_for_output(log, r"2 workers serving")
        for _ in range(3):  # 127.0.0.1 is not in 10.0.0.0/8: each is dropped unread
            with socket.create_connection(("127.0.0.1", port), timeout=TEST_TIMEOUT) as sock:
                sock.sendall(V1_CLIENT)
                # Closed with the header unread: a reset, which is as closed.
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(100) == b""
        wait_for_output(log, r"PROXY refused 3\b")
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(timeout=TEST_TIMEOUT) == 0
    finally:
        if sink.poll() is None:
            os.killpg(sink.pid, signal.SIGKILL)
            sink.wait()




async def test_the_session_log_names_the_headers_client(
    start_sink: SinkFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With --log-events, every line of a proxied session names the real client, and the
    stored message's queue id leads to them."""
    server = await proxy_sink(start_sink, tmp_path, log_events=True)
    with caplog.at_level(logging.INFO, logger=EVENTS_LOGGER):
        client = await SMTPClient.connect(server.addresses[0])
        try:
            await client.send(V1_CLIENT)
            await transaction(client)
        finally:
            await client.aclose()
        with trio.fail_after(TEST_TIMEOUT):
            while not any(r.__dict__.get("event") == "session_end" for r in caplog.records):
                await trio.sleep(0.01)
    [record] = read_maildir(tmp_path)
    lines = [r for r in caplog.records if r.__dict__.get("session") == record.session_id]
    assert {r.__dict__["event"] for r in lines} >= {
        "session_start", "message_accepted", "session_end"
    }
    assert {r.__dict__["client"].rsplit(":", 1)[0] for r in lines} == {"192.0.2.7"}
