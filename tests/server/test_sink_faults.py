"""Injected faults, delays, drops, throttle and magic addresses over real sockets.

Counts are exact, never statistical: ``every=N`` and seeded probabilities give known numbers,
and what is asserted is what happened (codes, stored messages, counters), not how long it took
(a delay is shown by its order of events: no reply before it may be sent, the reply after,
never a 421 though the delay is longer than the session's own timeout).
"""

from __future__ import annotations

import logging
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from conftest import TEST_TIMEOUT, SMTPClient, TLSFiles, wait_for_output

from mailstorm.sink import Address, ConfigError, SinkConfig, SinkServer
from mailstorm.sink.workers import WorkerSupervisor

Connect = Callable[..., Awaitable[SMTPClient]]
StartSink = Callable[..., Awaitable[SinkServer]]

BODY = b"Subject: fault test\r\n\r\nhello\r\n.\r\n"


def stored(folder: Path) -> int:
    new = folder / "new"
    return len(os.listdir(new)) if new.exists() else 0


async def nothing_arrives_before(client: SMTPClient, deadline: float) -> None:
    """Nothing is received until ``deadline`` (trio clock). Safe on a slow machine: the delay
    being tested starts after the moment ``deadline`` counts from, and slowness only adds."""
    with trio.move_on_at(deadline):
        data = await client.stream.receive_some(100)
        pytest.fail(f"received {data!r} before the delay was over")


async def transaction(client: SMTPClient, rcpt: str = "r@example.com") -> list[int]:
    """MAIL, RCPT, DATA and a body, one at a time; the codes (shorter when refused early)."""
    codes = [(await client.cmd("MAIL FROM:<s@example.com>")).code]
    codes.append((await client.cmd(f"RCPT TO:<{rcpt}>")).code)
    if codes[-1] != 250:
        await client.cmd("RSET")
        return codes
    codes.append((await client.cmd("DATA")).code)
    if codes[-1] != 354:
        return codes
    await client.send(BODY)
    codes.append((await client.reply()).code)
    return codes


async def test_every_fifth_end_of_data_is_refused_exactly(
    start_sink: StartSink, connect: Connect, tmp_path: Path
) -> None:
    folder = tmp_path / "md"
    server = await start_sink(store=f"maildir:{folder}", faults=("EOD:452:every=5",))
    eod_codes = []
    for _session in range(4):  # the count is per process, across sessions
        client = await connect(server.addresses[0])
        await client.cmd("EHLO c.test")
        for _ in range(25):
            eod_codes.append((await transaction(client))[-1])
        assert (await client.cmd("QUIT")).code == 221
    assert eod_codes.count(452) == 20 and eod_codes.count(250) == 80
    assert [i for i, code in enumerate(eod_codes) if code == 452] == list(range(4, 100, 5))
    assert stored(folder) == 80
    stats = server.stats
    assert (stats.messages, stats.messages_refused, stats.faults_replied) == (80, 20, 20)
    snapshot = stats.snapshot()
    assert snapshot["faults.EOD.452"] == 20
    assert "faults EOD 452 x20" in stats.interval_line()


async def test_rcpt_and_mail_faults_match_addresses(
    start_sink: StartSink, connect: Connect
) -> None:
    server = await start_sink(
        faults=(r"RCPT to=~@reject\.test:550", "MAIL from=bounce@*:451 4.7.1 go away")
    )
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    reply = await client.cmd("MAIL FROM:<bounce@example.com>")
    assert (reply.code, reply.text) == (451, "4.7.1 go away")
    assert (await client.cmd("MAIL FROM:<nobounce@example.com>")).code == 250
    reply = await client.cmd("RCPT TO:<x@reject.test>")
    assert reply.code == 550 and reply.enhanced == "5.1.1"
    assert (await client.cmd("RCPT TO:<x@accept.test>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    await client.send(BODY)
    assert (await client.reply()).code == 250
    assert server.stats.fault_counts == {"MAIL 451": 1, "RCPT 550": 1}
    assert server.stats.messages == 1


async def test_ehlo_421_closes_and_data_554_refuses(
    start_sink: StartSink, connect: Connect
) -> None:
    server = await start_sink(faults=("EHLO:421", "DATA:554"))
    client = await connect(server.addresses[0])
    reply = await client.cmd("EHLO c.test")
    assert reply.code == 421 and reply.text.startswith("4.3.0 sink.test ")
    await client.expect_closed()

    server = await start_sink(faults=("DATA:554",))
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    assert (await transaction(client))[1:] == [250, 554]
    assert server.stats.messages == 0 and server.stats.fault_counts == {"DATA 554": 1}


async def test_a_seeded_probability_gives_a_reproducible_count(
    start_sink: StartSink, connect: Connect
) -> None:
    async def codes(seed: int) -> list[int]:
        server = await start_sink(faults=("RCPT:450 4.2.0 mailbox busy:30%",), fault_seed=seed)
        client = await connect(server.addresses[0])
        await client.cmd("EHLO c.test")
        await client.cmd("MAIL FROM:<s@example.com>")
        got = [(await client.cmd(f"RCPT TO:<r{i}@example.com>")).code for i in range(200)]
        assert server.stats.faults_replied == got.count(450)
        return got

    first = await codes(11)
    assert first == await codes(11)
    assert 0 < first.count(450) < 200
    assert first != await codes(12)


@pytest.mark.parametrize("store", ["maildir", "discard"])  # a store in the task, or inline
async def test_an_eod_delay_longer_than_the_timeouts_still_gets_its_250(
    start_sink: StartSink, connect: Connect, tmp_path: Path, store: str
) -> None:
    folder = tmp_path / "md"
    server = await start_sink(store=f"maildir:{folder}" if store == "maildir" else "discard",
                              delays=("EOD:1.5s",), command_timeout=0.3, data_timeout=0.3)
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    assert await transaction(client) == [250, 250, 354, 250]
    assert server.stats.messages == 1
    assert stored(folder) == (1 if store == "maildir" else 0)
    assert (await client.cmd("NOOP")).code == 250  # the session goes on
    assert server.stats.faults_delayed == 1
    assert server.stats.fault_counts == {"EOD delay": 1}


async def test_a_banner_delay_sends_nothing_before_it_ends(
    start_sink: StartSink, connect: Connect
) -> None:
    server = await start_sink(delays=("BANNER:1.5s",), command_timeout=0.3)
    connecting = trio.current_time()
    client = await connect(server.addresses[0], banner=False)
    await nothing_arrives_before(client, connecting + 1.4)
    assert (await client.reply()).code == 220
    assert server.stats.faults_delayed == 1
    assert (await client.cmd("EHLO c.test")).code == 250


async def test_a_banner_delay_on_implicit_tls(
    start_sink: StartSink, tls_files: TLSFiles
) -> None:
    server = await start_sink(tls_listen=(Address("127.0.0.1", 0),), tls_cert=str(tls_files.cert),
                              tls_key=str(tls_files.key), delays=("BANNER:1.5s",),
                              command_timeout=0.3)
    connecting = trio.current_time()
    client = await SMTPClient.connect(server.tls_addresses[0])
    try:
        await client.starttls(tls_files.client_context())
        await nothing_arrives_before(client, connecting + 1.4)
        assert (await client.reply()).code == 220
        assert (await client.cmd("EHLO c.test")).code == 250
    finally:
        await client.aclose()
    assert server.stats.fault_counts == {"BANNER delay": 1}


async def test_a_graceful_stop_does_not_wait_for_a_tarpit(
    start_sink: StartSink, connect: Connect
) -> None:
    # Without interrupting the delay the client would wait a minute (the grace period, and
    # the delay): longer than TEST_TIMEOUT, so the test would fail.
    server = await start_sink(delays=("BANNER:60s",), grace_period=60)
    client = await connect(server.addresses[0], banner=False)
    while not server.stats.faults_delayed:
        await trio.sleep(0.01)
    server.shutdown()
    replies = []
    with trio.fail_after(TEST_TIMEOUT):
        while True:
            try:
                replies.append((await client.reply()).code)
            except EOFError:
                break
    assert replies == [220, 421]


async def test_rcpt_delay_inside_a_pipelined_group(
    start_sink: StartSink, connect: Connect
) -> None:
    server = await start_sink(delays=("RCPT to=slow@*:1.5s",), command_timeout=0.3)
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    sending = trio.current_time()
    await client.send("MAIL FROM:<s@x.test>\r\nRCPT TO:<fast@x.test>\r\nRCPT TO:<slow@x.test>\r\n"
                      "DATA\r\n")
    # The group's replies leave together, after the delay (on the inline path too).
    await nothing_arrives_before(client, sending + 1.4)
    assert [r.code for r in await client.replies(4)] == [250, 250, 250, 354]
    await client.send(BODY)
    assert (await client.reply()).code == 250
    assert server.stats.fault_counts == {"RCPT delay": 1}


async def test_a_drop_at_data_closes_mid_content_and_stores_nothing(
    start_sink: StartSink, connect: Connect, tmp_path: Path
) -> None:
    folder = tmp_path / "md"
    server = await start_sink(store=f"maildir:{folder}", drops=("DATA",))
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    await client.cmd("MAIL FROM:<s@example.com>")
    await client.cmd("RCPT TO:<r@example.com>")
    assert (await client.cmd("DATA")).code == 354
    await client.send(BODY)
    await client.expect_closed()
    assert client.parser.next_reply() is None  # no reply to the content
    assert stored(folder) == 0
    assert (server.stats.messages, server.stats.faults_dropped) == (0, 1)
    assert server.stats.fault_counts == {"DATA drop": 1}


async def test_a_drop_at_eod_every_other_message(
    start_sink: StartSink, connect: Connect, tmp_path: Path
) -> None:
    folder = tmp_path / "md"
    server = await start_sink(store=f"maildir:{folder}", drops=("EOD:every=2",))
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    assert await transaction(client) == [250, 250, 354, 250]
    await client.cmd("MAIL FROM:<s@example.com>")
    await client.cmd("RCPT TO:<r@example.com>")
    await client.cmd("DATA")
    await client.send(BODY)
    await client.expect_closed()
    assert client.parser.next_reply() is None
    assert stored(folder) == 1
    assert (server.stats.messages, server.stats.faults_dropped) == (1, 1)


async def test_throttle_slows_what_the_sink_reads(
    start_sink: StartSink, connect: Connect, tmp_path: Path
) -> None:
    folder = tmp_path / "md"
    # Shorter timeouts than the link needs: its time is not the client's.
    server = await start_sink(store=f"maildir:{folder}", throttle=2000,
                              command_timeout=0.5, data_timeout=0.5)
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    await client.cmd("MAIL FROM:<s@example.com>")
    await client.cmd("RCPT TO:<r@example.com>")
    assert (await client.cmd("DATA")).code == 354
    content = b"Subject: slow\r\n\r\n" + b"x" * 78 + b"\r\n"
    started = time.monotonic()
    await client.send(content * 60 + b".\r\n")  # 4,820 octets: 2.41 s at 2,000/s
    assert (await client.reply()).code == 250
    # A lower bound only: a busy machine can make this slower, never faster.
    assert time.monotonic() - started >= 2.0
    assert stored(folder) == 1
    assert server.stats.faults_delayed == 0  # a slow link is not a fault


async def test_magic_once_address_with_a_retrying_smtplib_client(
    start_sink: StartSink,
) -> None:
    server = await start_sink(magic_addresses=True)
    host, port = server.addresses[0]

    def send_with_retry() -> list[str]:
        outcomes = []
        for _ in range(3):
            try:
                with smtplib.SMTP(host, port, timeout=TEST_TIMEOUT) as smtp:
                    smtp.sendmail("s@example.com", ["450-once+order-17@fault.invalid"],
                                  "Subject: retry\r\n\r\nhi\r\n")
            except smtplib.SMTPRecipientsRefused as exc:
                (code, _), = exc.recipients.values()
                outcomes.append(f"refused {code}")
                continue
            outcomes.append("sent")
            break
        return outcomes

    assert await trio.to_thread.run_sync(send_with_retry) == ["refused 450", "sent"]
    assert server.stats.messages == 1
    assert server.stats.fault_counts == {"RCPT 450": 1}


async def test_other_magic_addresses(start_sink: StartSink, connect: Connect) -> None:
    server = await start_sink(magic_addresses=True)
    client = await connect(server.addresses[0])
    await client.cmd("EHLO c.test")
    await client.cmd("MAIL FROM:<s@example.com>")
    assert (await client.cmd("RCPT TO:<550@fault.invalid>")).code == 550
    assert (await client.cmd("RCPT TO:<delay-200ms@fault.invalid>")).code == 250
    assert (await client.cmd("RCPT TO:<nobody@example.com>")).code == 250
    assert (await client.cmd("RCPT TO:<421@fault.invalid>")).code == 421
    await client.expect_closed()
    assert server.stats.fault_counts == {"RCPT 550": 1, "RCPT delay": 1, "RCPT 421": 1}


async def test_each_fault_is_logged_once_at_info(
    start_sink: StartSink, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailstorm.sink")
    server = await start_sink(faults=("NOOP:450:every=2",))
    client = await connect(server.addresses[0])
    codes = [(await client.cmd("NOOP")).code for _ in range(4)]
    assert codes == [250, 450, 250, 450]
    lines = [r.getMessage() for r in caplog.records if "injected fault" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith("injected fault: NOOP 450 for 127.0.0.1 (fault 'NOOP:450:every=2')")


def test_config_takes_spec_lists_and_refuses_bad_specs() -> None:
    config = SinkConfig(faults=["EOD:452"], delays=["RCPT:1s"])  # type: ignore[arg-type]
    assert config.faults == ("EOD:452",) and config.delays == ("RCPT:1s",)
    with pytest.raises(ValueError, match="sequence of spec strings"):
        SinkConfig(faults="EOD:452")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="throttle must be a non-negative number"):
        SinkConfig(throttle=-1)
    with pytest.raises(ConfigError, match=r"^bad --drop 'EOD:every=x': unknown point"):
        SinkServer.from_config(SinkConfig(drops=("EOD:every=x",)))


def test_bad_specs_are_one_line_cli_errors() -> None:
    for option, spec, problem in [
        ("--fault", "RCPT:650", "reply code 650 is not a failure"),
        ("--delay", "EOD:soon", "bad duration 'soon'"),
        ("--drop", "EHLO from=x*", "from= cannot be known at EHLO"),
        ("--fault", "RCPT to=~(:550", "bad regular expression"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "mailstorm.sink", "--listen", "127.0.0.1:0", option, spec],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(
            f"python -m mailstorm.sink: error: bad {option} {spec!r}: "
        ), lines[0]
        assert problem in lines[0]


def test_workers_sum_fault_counters() -> None:
    supervisor = WorkerSupervisor([], 2, stats_interval=0)
    supervisor._current = [
        {"messages": 8, "faults_replied": 2, "faults.EOD.452": 2},
        {"messages": 4, "faults_replied": 1, "faults.EOD.452": 1, "faults.RCPT.delay": 3},
    ]
    supervisor._retire(1)
    supervisor._current[1] = {"faults.EOD.452": 5}
    totals = supervisor.totals()
    assert totals["faults.EOD.452"] == 8 and totals["faults.RCPT.delay"] == 3
    assert totals["faults_replied"] == 3 and totals["messages"] == 12
    assert "faults EOD 452 x8, RCPT delay x3" in supervisor.totals_line()


SMTP_SOURCE = "/usr/sbin/smtp-source"


needs_smtp_source = pytest.mark.skipif(
    not os.access(SMTP_SOURCE, os.X_OK), reason="needs Postfix smtp-source"
)


async def smtp_source(server: SinkServer, *args: str) -> subprocess.CompletedProcess[bytes]:
    host, port = server.addresses[0]
    with trio.fail_after(TEST_TIMEOUT * 3):
        return await trio.run_process(
            [SMTP_SOURCE, "-f", "s@example.com", "-t", "r@example.com", *args, f"{host}:{port}"],
            capture_stdout=True, capture_stderr=True, check=False,
        )


@needs_smtp_source
async def test_postfix_smtp_source_through_a_rcpt_fault(
    start_sink: StartSink, tmp_path: Path
) -> None:
    folder = tmp_path / "md"
    server = await start_sink(store=f"maildir:{folder}", faults=("RCPT:450:every=4",))
    # One session at a time: the 4th recipient is refused, and smtp-source gives up there.
    result = await smtp_source(server, "-s", "1", "-m", "20")
    assert result.returncode != 0
    assert b"recipient rejected: 450 4.2.0 " in result.stderr, result.stderr
    assert server.stats.fault_counts == {"RCPT 450": 1}
    assert server.stats.messages == 3 and stored(folder) == 3


@needs_smtp_source
async def test_postfix_smtp_source_through_delays(
    start_sink: StartSink, tmp_path: Path
) -> None:
    folder = tmp_path / "md"
    server = await start_sink(store=f"maildir:{folder}", delays=("RCPT:50ms:every=2",
                                                                  "EOD:50ms:every=5"))
    result = await smtp_source(server, "-s", "2", "-m", "20")
    assert result.returncode == 0, result.stderr
    assert server.stats.fault_counts == {"RCPT delay": 10, "EOD delay": 4}
    assert server.stats.messages == 20 and stored(folder) == 20


def test_every_worker_injects_the_faults(tmp_path: Path) -> None:
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        sink = subprocess.Popen(
            [sys.executable, "-m", "mailstorm.sink", "--workers", "2", "--listen", "127.0.0.1:0",
             "--fault", "EOD:452", "--delay", "EHLO:10ms"],
            stderr=stderr, start_new_session=True,
        )
    try:
        port = int(wait_for_output(log, r"listening on 127\.0\.0\.1:(\d+)").group(1))
        wait_for_output(log, r"2 workers serving")
        for i in range(10):
            with smtplib.SMTP("127.0.0.1", port, timeout=TEST_TIMEOUT) as smtp:
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    smtp.sendmail("s@example.com", ["r@example.com"], f"Subject: {i}\r\n\r\nx\r\n")
                assert refused.value.smtp_code == 452
    finally:
        os.killpg(sink.pid, signal.SIGTERM)
        sink.wait(timeout=60)
    assert sink.returncode == 0, log.read_text()
    # The supervisor's final line sums the workers' counters.
    stopped = wait_for_output(log, r"stopped: 2 workers: .*").group(0)
    assert "messages 0," in stopped
    assert "faults EHLO delay x10, EOD 452 x10" in stopped, stopped


