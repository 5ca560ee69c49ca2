"""The embedding API (``open_sink`` in trio, ``SinkThread`` anywhere), driven by smtplib over
real loopback sockets, as its users will drive it."""

from __future__ import annotations

import smtplib
import socket
import threading
from email.message import EmailMessage
from pathlib import Path

import pytest
import trio
from conftest import TEST_TIMEOUT, TLSFiles

from mailstorm.sink import (
    ConfigError,
    MessageRecord,
    NoRecords,
    SinkConfig,
    SinkThread,
    SinkTimeout,
    open_sink,
)

RAW = (
    b"From: Sender <sender@example.test>\r\n"
    b"To: rcpt@example.test\r\n"
    b"Subject: =?UTF-8?B?5rWL6K+V?= =?ISO-8859-1?Q?caf=E9?=\r\n"
    b"X-Second: =?ISO-8859-1?Q?caf=E9?=\r\n"
    b"\r\n"
    b".a line that gets dot-stuffed\r\n"
    b"body\r\n"
)


def send(
    address: tuple[str, int],
    raw: bytes = RAW,
    *,
    sender: str = "sender@example.test",
    rcpts: tuple[str, ...] = ("rcpt@example.test",),
    mail_options: tuple[str, ...] = (),
    source: tuple[str, int] | None = None,
) -> None:
    with smtplib.SMTP(*address, timeout=TEST_TIMEOUT, source_address=source) as client:
        client.sendmail(sender, list(rcpts), raw, mail_options=list(mail_options))


async def send_in_thread(address: tuple[str, int], **kwargs: object) -> None:
    await trio.to_thread.run_sync(lambda: send(address, **kwargs))  # type: ignore[arg-type]


# ---- open_sink (trio) -------------------------------------------------------------------------


async def test_a_message_comes_back_as_a_record_with_its_envelope() -> None:
    async with open_sink() as sink:
        assert sink.host == "127.0.0.1" and sink.port > 0
        await send_in_thread(
            sink.address,
            rcpts=("one@example.test", "two@example.test"),
            mail_options=("BODY=8BITMIME",),
        )
        (record,) = await sink.wait_for(1, timeout=TEST_TIMEOUT)
    assert isinstance(record, MessageRecord)
    assert record.mail_from == "sender@example.test"
    assert record.rcpt_tos == ["one@example.test", "two@example.test"]
    assert record.client_address == "127.0.0.1"
    assert record.tls is False and record.auth_user is None
    assert record.envelope.mail_options["BODY"] == "8BITMIME"
    assert record.envelope.helo  # smtplib says EHLO with its name
    # The content exactly as sent (smtplib dot-stuffs, the sink unstuffs), without trace.
    assert record.raw == RAW
    assert record.trace.startswith(b"Return-Path: <sender@example.test>\r\nReceived: ")


async def test_encoded_words_decode_with_the_default_policy() -> None:
    async with open_sink() as sink:
        await send_in_thread(sink.address)
        (record,) = await sink.wait_for(1, timeout=TEST_TIMEOUT)
    message = record.message
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == "测试café"
    assert message["X-Second"] == "café"
    assert message["From"].addresses[0].addr_spec == "sender@example.test"
    assert message.get_content() == ".a line that gets dot-stuffed\nbody\n"


async def test_the_client_address_is_the_connecting_one() -> None:
    async with open_sink() as sink:
        await send_in_thread(sink.address, source=("127.0.0.2", 0))
        (record,) = await sink.wait_for(1, timeout=TEST_TIMEOUT)
    assert record.client_address == "127.0.0.2"


async def test_tls_and_the_auth_user_are_recorded(tls_files: TLSFiles, auth_file: Path) -> None:
    async with open_sink(
        tls_cert=str(tls_files.cert), tls_key=str(tls_files.key), auth_file=str(auth_file)
    ) as sink:

        def send_over_tls() -> None:
            with smtplib.SMTP(*sink.address, timeout=TEST_TIMEOUT) as client:
                client.starttls(context=tls_files.client_context())
                client.login("alice", "wonderland")
                client.sendmail("sender@example.test", ["rcpt@example.test"], RAW)

        await trio.to_thread.run_sync(send_over_tls)
        (record,) = await sink.wait_for(1, timeout=TEST_TIMEOUT)
    assert record.tls is True
    assert record.auth_user == "alice"
    assert sink.stats.tls_sessions == 1


async def test_wait_for_counts_arrivals_and_times_out_with_a_clear_error() -> None:
    async with open_sink() as sink:
        await send_in_thread(sink.address)
        with pytest.raises(SinkTimeout, match=r"waited 0\.2s for 2 messages, 1 arrived"):
            await sink.wait_for(2, timeout=0.2)
        await send_in_thread(sink.address)
        records = await sink.wait_for(2, timeout=TEST_TIMEOUT)
    assert len(records) == 2


async def test_the_record_log_is_bounded_and_counts_what_it_dropped() -> None:
    async with open_sink(max_messages=3) as sink:
        for n in range(5):
            await send_in_thread(sink.address, sender=f"s{n}@example.test")
        # wait_for counts arrivals, dropped ones included, so it works past the bound.
        records = await sink.wait_for(5, timeout=TEST_TIMEOUT)
        assert [r.mail_from for r in records] == [f"s{n}@example.test" for n in (2, 3, 4)]
        assert sink.dropped == 2
        assert sink.stats.messages == 5


async def test_clear_forgets_the_records_and_restarts_the_count() -> None:
    async with open_sink() as sink:
        await send_in_thread(sink.address, sender="first@example.test")
        await sink.wait_for(1, timeout=TEST_TIMEOUT)
        sink.clear()
        assert sink.messages == []
        await send_in_thread(sink.address, sender="second@example.test")
        (record,) = await sink.wait_for(1, timeout=TEST_TIMEOUT)
    assert record.mail_from == "second@example.test"


async def test_maildir_records_are_read_back_from_the_files(tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    async with open_sink(store=f"maildir:{maildir}") as sink:
        await send_in_thread(sink.address)
        (record,) = await sink.wait_for(1, timeout=TEST_TIMEOUT)
    assert record.path is not None
    stored = Path(record.path)
    assert stored.parent == maildir / "new"
    assert stored.read_bytes() == record.trace + record.raw
    assert record.raw == RAW
    assert record.message["Subject"] == "测试café"
    assert record.rcpt_tos == ["rcpt@example.test"]


async def test_stores_without_records_say_so_and_still_count(tmp_path: Path) -> None:
    async with open_sink(store="discard") as sink:
        await send_in_thread(sink.address)
        with pytest.raises(NoRecords, match="keeps no records"):
            sink.messages  # noqa: B018
        with pytest.raises(NoRecords):
            await sink.wait_for(1)
    assert sink.stats.messages == 1


async def test_an_error_in_the_block_comes_out_as_itself() -> None:
    with pytest.raises(ZeroDivisionError):
        async with open_sink() as sink:
            await send_in_thread(sink.address)
            1 / 0  # noqa: B018


async def test_leaving_the_block_stops_listening() -> None:
    async with open_sink() as sink:
        address = sink.address
    with pytest.raises(OSError), socket.create_connection(address, timeout=TEST_TIMEOUT):
        pass


async def test_a_port_in_use_is_a_config_error_at_start() -> None:
    async with open_sink() as first:
        with pytest.raises(ConfigError, match="address already in use"):
            async with open_sink(listen=[f"127.0.0.1:{first.port}"]):
                pass  # pragma: no cover


async def test_sink_options_are_sink_config_fields() -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        open_sink(no_such_option=1)
    with pytest.raises(TypeError, match=r"faults=\['RCPT:450'\]"):
        open_sink(faults="RCPT:450")
    async with open_sink(hostname="sink.example", max_size=1000) as sink:

        def ehlo() -> tuple[int, bytes]:
            with smtplib.SMTP(*sink.address, timeout=TEST_TIMEOUT) as client:
                return client.ehlo()

        code, text = await trio.to_thread.run_sync(ehlo)
    assert code == 250
    assert text.startswith(b"sink.example")
    assert b"SIZE 1000" in text


# ---- SinkThread (synchronous code) ----------------------------------------------------------


def sink_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mailstorm-sink"]


def test_sink_thread_listens_on_return_and_stops_cleanly() -> None:
    before = sink_threads()
    with SinkThread() as sink:
        # No wait and no retry: the sink listens as soon as the block begins.
        send(sink.address)
        (record,) = sink.wait_for(1, timeout=TEST_TIMEOUT)
        assert record.message["Subject"] == "测试café"
        address = sink.address
    assert sink_threads() == before
    with pytest.raises(OSError), socket.create_connection(address, timeout=TEST_TIMEOUT):
        pass


def test_sink_thread_wait_for_blocks_until_messages_arrive() -> None:
    with SinkThread() as sink:
        senders = [
            threading.Thread(target=send, args=(sink.address,), kwargs={"sender": f"s{n}@x.test"})
            for n in range(3)
        ]
        for thread in senders:
            thread.start()
        records = sink.wait_for(3, timeout=TEST_TIMEOUT)
        for thread in senders:
            thread.join(TEST_TIMEOUT)
        assert sorted(r.mail_from for r in records) == ["s0@x.test", "s1@x.test", "s2@x.test"]
        with pytest.raises(SinkTimeout, match="3 arrived"):
            sink.wait_for(4, timeout=0.2)
        sink.clear()
        assert sink.messages == []


def test_sink_thread_start_errors_are_raised_in_the_caller(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        SinkThread(no_such_option=1)
    with SinkThread() as first, pytest.raises(ConfigError, match="address already in use"):
        SinkThread(listen=[f"127.0.0.1:{first.port}"]).start()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="maildir"):
        SinkThread(store=f"maildir:{tmp_path / 'file'}").start()
    assert sink_threads() == []


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_sink_thread_stop_is_graceful_for_an_open_session() -> None:
    with SinkThread() as sink:
        sock = socket.create_connection(sink.address, timeout=TEST_TIMEOUT)
        assert sock.recv(4096).startswith(b"220 ")
    # Stopping told the idle session 421 and closed it, and only then returned.
    with sock:
        assert read_until_closed(sock).startswith(b"421 4.3.2 ")


def test_sink_thread_wait_for_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        SinkThread().wait_for(1)


def test_sink_thread_implicit_tls(tls_files: TLSFiles) -> None:
    with SinkThread(
        listen=(),
        tls_listen=["127.0.0.1:0"],
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
    ) as sink:
        assert sink.tls_address == sink.address
        with smtplib.SMTP_SSL(
            *sink.address, timeout=TEST_TIMEOUT, context=tls_files.client_context()
        ) as client:
            client.sendmail("a@x.test", ["b@x.test"], RAW)
        (record,) = sink.wait_for(1, timeout=TEST_TIMEOUT)
    assert record.tls is True


# ---- faults through the API (the fault options are SinkConfig fields) ----------------------

needs_faults = pytest.mark.skipif(
    "faults" not in SinkConfig.__dataclass_fields__,
    reason="SinkConfig has no 'faults' field yet (fault injection, issue 11)",
)


@needs_faults
async def test_open_sink_injects_faults_exactly() -> None:
    async with open_sink(faults=["EOD:452:every=5"]) as sink:

        def send_ten() -> list[int]:
            refused = []
            for n in range(10):
                try:
                    send(sink.address, sender=f"s{n}@example.test")
                except smtplib.SMTPDataError as exc:
                    refused.append(exc.smtp_code)
            return refused

        refused = await trio.to_thread.run_sync(send_ten)
        records = await sink.wait_for(8, timeout=TEST_TIMEOUT)
    assert refused == [452, 452]
    # The 5th and the 10th end of data were refused, so they are not stored.
    assert [r.mail_from for r in records] == [
        f"s{n}@example.test" for n in (0, 1, 2, 3, 5, 6, 7, 8)
    ]
    assert sink.stats.messages == 8
    assert sink.stats.faults_replied == 2
    assert sink.stats.fault_counts == {"EOD 452": 2}


@needs_faults
def test_sink_thread_refuses_matching_recipients() -> None:
    with SinkThread(faults=[r"RCPT to=~@reject\.test:550"]) as sink:
        with smtplib.SMTP(*sink.address, timeout=TEST_TIMEOUT) as client:
            refused = client.sendmail(
                "a@example.test", ["ok@example.test", "bad@reject.test"], RAW
            )
        (record,) = sink.wait_for(1, timeout=TEST_TIMEOUT)
    assert list(refused) == ["bad@reject.test"]
    assert refused["bad@reject.test"][0] == 550
    assert record.rcpt_tos == ["ok@example.test"]


def test_sink_thread_wait_for_works_from_another_trio_loop() -> None:
    """A trio program may hold a SinkThread too: its wait_for blocks that program's loop, not
    the sink's, which keeps serving."""
    with SinkThread() as sink:

        async def main() -> list[MessageRecord]:
            sender = threading.Thread(target=send, args=(sink.address,))
            sender.start()
            try:
                return sink.wait_for(1, timeout=TEST_TIMEOUT)
            finally:
                sender.join(TEST_TIMEOUT)

        (record,) = trio.run(main)
    assert record.rcpt_tos == ["rcpt@example.test"]


@pytest.mark.parametrize("spec", ["memory:0", "memory:many", "memory:"])
def test_a_bad_memory_store_spec_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="expected 'memory:N'"):
        SinkThread(store=spec).start()


def test_records_stay_readable_after_the_sink_stopped() -> None:
    with SinkThread(store="memory:5") as sink:
        send(sink.address)
        sink.wait_for(1, timeout=TEST_TIMEOUT)
    (record,) = sink.messages
    assert record.message["X-Second"] == "café"


@needs_faults
def test_a_retrying_client_against_a_magic_address() -> None:
    """450-once+KEY@fault.invalid refuses the first attempt for KEY and accepts the retry."""
    rcpt = "450-once+order-17@fault.invalid"
    with SinkThread(magic_addresses=True) as sink:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send(sink.address, rcpts=(rcpt,))
        assert refused.value.recipients[rcpt][0] == 450
        assert sink.messages == []
        send(sink.address, rcpts=(rcpt,))
        (record,) = sink.wait_for(1, timeout=TEST_TIMEOUT)
    assert record.rcpt_tos == [rcpt]
