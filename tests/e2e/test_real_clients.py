"""Real SMTP clients against an in-process sink: Python's smtplib, swaks, curl and Postfix's
smtp-source, all over loopback.

Each test checks what the client reports (exit status, replies) and what the sink stored:
Maildir files whose content after the sink's trace headers is byte for byte what the client
sent, and the server's counters. Tests needing an external binary are skipped, with the reason,
when it is not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import email
import email.generator
import email.policy
import io
import mailbox
import shutil
import smtplib
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import TEST_TIMEOUT, TLSFiles

from mailstorm.sink import Address, SinkServer

pytestmark = pytest.mark.e2e

StartSink = Callable[..., Awaitable[SinkServer]]

#: Bound on one external client run (smtp-source sends thousands of messages).
PROCESS_TIMEOUT = 180.0

SWAKS = shutil.which("swaks")
CURL = shutil.which("curl")
SMTP_SOURCE = shutil.which("smtp-source") or shutil.which("/usr/sbin/smtp-source")


def needs(binary: str | None, name: str, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        binary is None, reason=f"{name} is not installed (Debian package {package!r})"
    )


# ---- helpers ---------------------------------------------------------------------------


def maildir_files(root: Path) -> list[bytes]:
    """The raw bytes of every message in ``root/new``, oldest name first."""
    return [path.read_bytes() for path in sorted((root / "new").iterdir())]


def split_trace(raw: bytes) -> tuple[str, bytes]:
    """Split a stored message into its trace headers (unfolded, as text) and the content.

    The sink prepends exactly ``Return-Path`` and one (possibly folded) ``Received`` header.
    """
    assert raw.startswith(b"Return-Path: <"), raw[:200]
    pos = raw.index(b"\r\n") + 2
    assert raw.startswith(b"Received: ", pos), raw[:400]
    pos = raw.index(b"\r\n", pos) + 2
    while raw[pos : pos + 1] == b"\t":
        pos = raw.index(b"\r\n", pos) + 2
    trace = raw[:pos].decode("utf-8").replace("\r\n\t", " ")
    return trace, raw[pos:]


def only_message(root: Path) -> tuple[str, bytes]:
    files = maildir_files(root)
    assert len(files) == 1, f"{len(files)} messages stored"
    return split_trace(files[0])


def assert_clean_maildir(root: Path, count: int) -> None:
    """``count`` messages in new/, nothing left in tmp/, and mailbox.Maildir agrees."""
    assert len(list((root / "new").iterdir())) == count
    assert list((root / "tmp").iterdir()) == []
    assert len(mailbox.Maildir(str(root), factory=None, create=False)) == count


async def run_client(args: list[str], **kwargs: Any) -> tuple[int, str]:
    """Run an external client; return its exit status and stdout+stderr as text."""
    with trio.fail_after(PROCESS_TIMEOUT):
        result = await trio.run_process(
            args, capture_stdout=True, capture_stderr=True, check=False, **kwargs
        )
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    return result.returncode, output


async def in_thread(fn: Callable[[], Any]) -> Any:
    """Run a blocking client (smtplib, bounded by its socket timeout) off the trio thread."""
    return await trio.to_thread.run_sync(fn)


def tls_sink_options(tls_files: TLSFiles, auth_file: Path, mail: Path) -> dict[str, Any]:
    return {
        "tls_cert": str(tls_files.cert),
        "tls_key": str(tls_files.key),
        "auth_file": str(auth_file),
        "store": f"maildir:{mail}",
    }


def ca_file(tls_files: TLSFiles) -> Path:
    return tls_files.cert.parent / "ca.pem"


# ---- smtplib ---------------------------------------------------------------------------------

SUBJECT = "Grüße 你好 — ünïcödé"
ATTACHMENT = bytes(range(256)) * 16 + b"\r\n.\r\nFrom \x00\xff"


def mime_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.org>"
    msg["To"] = "Bob <bob@example.org>"
    msg["Subject"] = SUBJECT
    msg.set_content("Hello Bob,\n\n.a line with a leading dot\nFrom the attachment, see below.\n")
    msg.add_attachment(
        ATTACHMENT, maintype="application", subtype="octet-stream", filename="blob.bin"
    )
    return msg


def smtp_flatten(msg: EmailMessage) -> bytes:
    """The message as smtplib's send_message puts it on the wire (before dot-stuffing).

    Flattening also fixes the MIME boundary on ``msg``, so smtplib's own flattening later
    produces the same bytes.
    """
    buffer = io.BytesIO()
    email.generator.BytesGenerator(buffer).flatten(msg, linesep="\r\n")
    data = buffer.getvalue()
    return data if data.endswith(b"\r\n") else data + b"\r\n"


async def test_smtplib_mime_starttls_login(
    start_sink: StartSink, tls_files: TLSFiles, auth_file: Path, tmp_path: Path
) -> None:
    """smtplib: STARTTLS, login, send_message of a MIME message with an RFC 2047 subject and a
    binary attachment. The stored content is exactly what smtplib sent; the subject decodes
    to the original; the attachment round-trips; Received says ESMTPSA and names TLS."""
    mail = tmp_path / "mail"
    server = await start_sink(**tls_sink_options(tls_files, auth_file, mail))
    host, port = server.addresses[0]
    msg = mime_message()
    expected = smtp_flatten(msg)
    assert b"=?utf-8?" in expected  # the subject really travels as encoded words
    context = tls_files.client_context()

    def send() -> dict[str, Any]:
        with smtplib.SMTP(host, port, local_hostname="client.test", timeout=TEST_TIMEOUT) as smtp:
            smtp.starttls(context=context)
            smtp.ehlo()
            assert smtp.has_extn("auth") and not smtp.has_extn("starttls")
            smtp.login("alice", "wonderland")
            return smtp.send_message(msg)

    assert await in_thread(send) == {}

    assert_clean_maildir(mail, 1)
    trace, content = only_message(mail)
    assert content == expected
    assert trace.startswith("Return-Path: <alice@example.org>\r\n")
    assert " with ESMTPSA " in trace
    assert "version=TLSv1." in trace and "cipher=" in trace
    assert "(authenticated as alice)" in trace
    assert "from client.test " in trace and "for <bob@example.org>" in trace

    parsed = email.message_from_bytes(content, policy=email.policy.default)
    assert parsed["Subject"] == SUBJECT
    attachments = list(parsed.iter_attachments())  # type: ignore[attr-defined]
    assert len(attachments) == 1
    assert attachments[0].get_filename() == "blob.bin"
    assert attachments[0].get_content() == ATTACHMENT

    # mailbox.Maildir reads the same message (trace headers included).
    box = mailbox.Maildir(str(mail), factory=None, create=False)
    (key,) = box.keys()
    assert box.get_bytes(key).endswith(expected)
    assert server.stats.messages == 1 and server.stats.tls_sessions == 1


async def test_smtplib_login_mechanisms(
    start_sink: StartSink, tls_files: TLSFiles, auth_file: Path, tmp_path: Path
) -> None:
    """smtplib's AUTH LOGIN and AUTH PLAIN both work (bob's password has a colon and a space),
    and a wrong password raises SMTPAuthenticationError with 535."""
    server = await start_sink(**tls_sink_options(tls_files, auth_file, tmp_path / "mail"))
    host, port = server.addresses[0]
    context = tls_files.client_context()

    def exchange() -> tuple[int, int, int]:
        codes = []
        for mechanism, password in (("LOGIN", "pa:ss word"), ("PLAIN", "pa:ss word")):
            with smtplib.SMTP(host, port, timeout=TEST_TIMEOUT) as smtp:
                smtp.starttls(context=context)
                smtp.ehlo()
                smtp.user, smtp.password = "bob", password
                authobject = smtp.auth_login if mechanism == "LOGIN" else smtp.auth_plain
                codes.append(smtp.auth(mechanism, authobject)[0])
        with smtplib.SMTP(host, port, timeout=TEST_TIMEOUT) as smtp:
            smtp.starttls(context=context)
            with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
                smtp.login("bob", "pa:ss")
            codes.append(failure.value.smtp_code)
        return codes[0], codes[1], codes[2]

    assert await in_thread(exchange) == (235, 235, 535)
    assert server.stats.auth_failures >= 1


DOTS_AND_FROMS = (
    b"Subject: dots and Froms\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two leading dots\r\n"
    b".\r\n"
    b"From the start of a line\r\n"
    b"From \r\n"
    b">From already quoted\r\n"
    b" .space then dot\r\n"
    b"last line\r\n"
)

EIGHT_BIT = (
    "Subject: 8bit\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Grüße, 你好, ½ ∞ — ça va?\r\n"
    ".Ünïcode after a dot\r\n"
).encode()


async def test_smtplib_sendmail_dots_and_from_lines(start_sink: StartSink, tmp_path: Path) -> None:
    """Lines starting with "." and "From " survive smtplib's dot-stuffing and the sink's
    unstuffing byte for byte (Maildir does no From quoting)."""
    mail = tmp_path / "mail"
    server = await start_sink(store=f"maildir:{mail}")
    host, port = server.addresses[0]

    def send() -> dict[str, Any]:
        with smtplib.SMTP(host, port, timeout=TEST_TIMEOUT) as smtp:
            return smtp.sendmail("a@example.org", ["b@example.org"], DOTS_AND_FROMS)

    assert await in_thread(send) == {}
    trace, content = only_message(mail)
    assert content == DOTS_AND_FROMS
    assert " with ESMTP " in trace


async def test_smtplib_8bitmime(start_sink: StartSink, tmp_path: Path) -> None:
    """BODY=8BITMIME with a raw UTF-8 body is accepted and stored unchanged."""
    mail = tmp_path / "mail"
    server = await start_sink(store=f"maildir:{mail}")
    host, port = server.addresses[0]

    def send() -> dict[str, Any]:
        with smtplib.SMTP(host, port, timeout=TEST_TIMEOUT) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("8bitmime")
            return smtp.sendmail(
                "a@example.org", ["b@example.org"], EIGHT_BIT, mail_options=["BODY=8BITMIME"]
            )

    assert await in_thread(send) == {}
    _, content = only_message(mail)
    assert content == EIGHT_BIT


UTF8_FROM = "jörg@bücher.example"
UTF8_TO = "用户@例子.广告"


async def test_smtplib_smtputf8(start_sink: StartSink, tmp_path: Path) -> None:
    """SMTPUTF8 with UTF-8 envelope addresses: accepted, stored with the addresses in the
    trace headers as UTF-8 and the protocol named UTF8SMTP."""
    mail = tmp_path / "mail"
    server = await start_sink(store=f"maildir:{mail}")
    host, port = server.addresses[0]
    body = f"From: {UTF8_FROM}\r\nTo: {UTF8_TO}\r\nSubject: ünïcode\r\n\r\nhi\r\n".encode()

    def send() -> dict[str, Any]:
        with smtplib.SMTP(host, port, timeout=TEST_TIMEOUT) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("smtputf8")
            return smtp.sendmail(
                UTF8_FROM, [UTF8_TO], body, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
            )

    assert await in_thread(send) == {}
    trace, content = only_message(mail)
    assert content == body
    assert trace.startswith(f"Return-Path: <{UTF8_FROM}>\r\n")
    assert f"for <{UTF8_TO}>" in trace
    assert " with UTF8SMTP " in trace


async def test_smtplib_utf8_address_without_smtputf8(start_sink: StartSink, tmp_path: Path) -> None:
    """A UTF-8 sender or recipient without the SMTPUTF8 parameter is refused with 553 5.6.7,
    and nothing is stored."""
    mail = tmp_path / "mail"
    server = await start_sink(store=f"maildir:{mail}")
    host, port = server.addresses[0]

    def exchange() -> list[tuple[int, bytes]]:
        with smtplib.SMTP(host, port, timeout=TEST_TIMEOUT) as smtp:
            # smtplib would refuse to encode the address itself; make it send the UTF-8.
            smtp.command_encoding = "utf-8"
            smtp.ehlo()
            replies = [smtp.mail(UTF8_FROM)]
            replies.append(smtp.mail("a@example.org"))
            replies.append(smtp.rcpt(UTF8_TO))
            smtp.rset()  # which also sets command_encoding back to ASCII
            smtp.command_encoding = "utf-8"
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                smtp.sendmail(UTF8_FROM, ["b@example.org"], b"Subject: x\r\n\r\nx\r\n")
            replies.append((refused.value.smtp_code, refused.value.smtp_error))
            return replies

    replies = await in_thread(exchange)
    codes = [code for code, _ in replies]
    assert codes == [553, 250, 553, 553], replies
    assert replies[0][1].startswith(b"5.6.7 ")
    assert maildir_files(mail) == []
    assert server.stats.messages == 0


# ---- swaks -----------------------------------------------------------------------------------

SWAKS_DATA = b"Subject: swaks exact\r\n\r\n.dot line\r\n.\r\nFrom here\r\nend\r\n"


def swaks(port: int, *extra: str) -> list[str]:
    assert SWAKS is not None
    return [
        SWAKS,
        "--server",
        f"127.0.0.1:{port}",
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.org",
        "--helo",
        "client.test",
        "--timeout",
        str(int(TEST_TIMEOUT)),
        *extra,
    ]


@needs(SWAKS, "swaks", "swaks")
async def test_swaks_plain(start_sink: StartSink, tmp_path: Path) -> None:
    """swaks's default message over plain SMTP is accepted and stored."""
    mail = tmp_path / "mail"
    server = await start_sink(store=f"maildir:{mail}")
    status, output = await run_client(
        swaks(server.addresses[0][1], "--header", "Subject: swaks plain", "--body", "hi swaks")
    )
    assert status == 0, output
    trace, content = only_message(mail)
    assert b"Subject: swaks plain\r\n" in content
    assert b"\r\n\r\nhi swaks\r\n" in content
    assert " with ESMTP " in trace


@needs(SWAKS, "swaks", "swaks")
@pytest.mark.parametrize(
    ("mechanism", "user", "password"),
    [("LOGIN", "alice", "wonderland"), ("PLAIN", "bob", "pa:ss word")],
)
async def test_swaks_starttls_auth(
    start_sink: StartSink,
    tls_files: TLSFiles,
    auth_file: Path,
    tmp_path: Path,
    mechanism: str,
    user: str,
    password: str,
) -> None:
    """swaks --tls with --auth LOGIN / PLAIN: exit 0, message stored with ESMTPSA and the
    authenticated user in the Received header."""
    mail = tmp_path / "mail"
    server = await start_sink(**tls_sink_options(tls_files, auth_file, mail))
    status, output = await run_client(
        swaks(
            server.addresses[0][1],
            "--tls",
            "--auth",
            mechanism,
            "--auth-user",
            user,
            "--auth-password",
            password,
            "--header",
            f"Subject: swaks {mechanism}",
        )
    )
    assert status == 0, output
    assert "235" in output
    trace, content = only_message(mail)
    assert f"Subject: swaks {mechanism}\r\n".encode() in content
    assert " with ESMTPSA " in trace and "version=TLSv1." in trace
    assert f"(authenticated as {user})" in trace


@needs(SWAKS, "swaks", "swaks")
async def test_swaks_pipeline_exact_data(start_sink: StartSink, tmp_path: Path) -> None:
    """swaks --pipeline sends MAIL/RCPT/DATA as one group; the DATA file's dot and From lines
    are stored exactly (swaks adds one CRLF before the final dot)."""
    mail = tmp_path / "mail"
    server = await start_sink(store=f"maildir:{mail}")
    data_file = tmp_path / "message.eml"
    data_file.write_bytes(SWAKS_DATA)
    status, output = await run_client(
        swaks(server.addresses[0][1], "--pipeline", "--data", f"@{data_file}")
    )
    assert status == 0, output
    _, content = only_message(mail)
    assert content in (SWAKS_DATA, SWAKS_DATA + b"\r\n")


@needs(SWAKS, "swaks", "swaks")
async def test_swaks_wrong_password(
    start_sink: StartSink, tls_files: TLSFiles, auth_file: Path, tmp_path: Path
) -> None:
    """A wrong password: swaks exits non-zero, its transcript shows the 535, nothing stored."""
    mail = tmp_path / "mail"
    server = await start_sink(**tls_sink_options(tls_files, auth_file, mail))
    status, output = await run_client(
        swaks(
            server.addresses[0][1],
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "looking-glass",
        )
    )
    assert status != 0, output
    assert "535 5.7.8" in output
    assert maildir_files(mail) == []
    assert server.stats.auth_failures == 1


# ---- curl ------------------------------------------------------------------------------------

CURL_MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.org>, Carol <carol@example.org>\r\n"
    b"Subject: via curl\r\n"
    b"\r\n"
    b"Hello from curl.\r\n"
    b".a dot line\r\n"
    b"From a From line\r\n"
)


def curl(url: str, upload: Path, *extra: str) -> list[str]:
    assert CURL is not None
    return [
        CURL,
        "--silent",
        "--show-error",
        "--max-time",
        str(int(TEST_TIMEOUT)),
        url,
        "--mail-from",
        "alice@example.org",
        "--mail-rcpt",
        "bob@example.org",
        "--mail-rcpt",
        "carol@example.org",
        "--upload-file",
        str(upload),
        *extra,
    ]


@needs(CURL, "curl", "curl")
@pytest.mark.parametrize("mode", ["plain", "starttls", "smtps"])
async def test_curl(
    start_sink: StartSink, tls_files: TLSFiles, auth_file: Path, tmp_path: Path, mode: str
) -> None:
    """curl smtp:// (plain, and STARTTLS with --ssl-reqd and --user) and smtps:// (implicit
    TLS listener): two recipients, the uploaded file stored exactly."""
    mail = tmp_path / "mail"
    server = await start_sink(
        **tls_sink_options(tls_files, auth_file, mail),
        tls_listen=(Address("127.0.0.1", 0),),
    )
    upload = tmp_path / "message.eml"
    upload.write_bytes(CURL_MESSAGE)
    tls = ["--cacert", str(ca_file(tls_files)), "--user", "alice:wonderland"]
    if mode == "plain":
        args = curl(f"smtp://127.0.0.1:{server.addresses[0][1]}/client.test", upload)
    elif mode == "starttls":
        url = f"smtp://127.0.0.1:{server.addresses[0][1]}/client.test"
        args = curl(url, upload, "--ssl-reqd", *tls)
    else:
        url = f"smtps://127.0.0.1:{server.tls_addresses[0][1]}/client.test"
        args = curl(url, upload, *tls)
    status, output = await run_client(args)
    assert status == 0, output

    trace, content = only_message(mail)
    assert content == CURL_MESSAGE
    assert trace.startswith("Return-Path: <alice@example.org>\r\n")
    # Two recipients: the Received header names neither (RFC 5321 7.6).
    assert "for <" not in trace
    assert server.stats.recipients == 2
    if mode == "plain":
        assert " with ESMTP " in trace
    else:
        assert " with ESMTPSA " in trace and "version=TLSv1." in trace
        assert "(authenticated as alice)" in trace
        assert server.stats.tls_sessions == 1


@needs(CURL, "curl", "curl")
async def test_curl_rejects_untrusted_certificate(
    start_sink: StartSink, tls_files: TLSFiles, auth_file: Path, tmp_path: Path
) -> None:
    """Without the test CA curl refuses the handshake: the sink stores nothing and keeps
    serving (a second, trusting curl run succeeds)."""
    mail = tmp_path / "mail"
    server = await start_sink(**tls_sink_options(tls_files, auth_file, mail))
    upload = tmp_path / "message.eml"
    upload.write_bytes(CURL_MESSAGE)
    url = f"smtp://127.0.0.1:{server.addresses[0][1]}/client.test"
    status, output = await run_client(curl(url, upload, "--ssl-reqd"))
    assert status != 0, output
    assert maildir_files(mail) == []
    status, output = await run_client(
        curl(url, upload, "--ssl-reqd", "--cacert", str(ca_file(tls_files)))
    )
    assert status == 0, output
    assert len(maildir_files(mail)) == 1


# ---- Postfix smtp-source -------------------------------------------------------------------


def smtp_source(port: int, *options: str) -> list[str]:
    assert SMTP_SOURCE is not None
    return [
        SMTP_SOURCE,
        *options,
        "-M",
        "client.test",
        "-f",
        "from@example.com",
        "-t",
        "to@example.com",
        f"127.0.0.1:{port}",
    ]


@needs(SMTP_SOURCE, "smtp-source", "postfix")
async def test_smtp_source_2000_messages_50_sessions(start_sink: StartSink, tmp_path: Path) -> None:
    """smtp-source sends 2,000 messages of 1 KiB, 50 sessions in parallel (a new connection
    per message, its default): exactly 2,000 files in new/, none in tmp/, 2,000 counted."""
    mail = tmp_path / "mail"
    server = await start_sink(store=f"maildir:{mail}")
    status, output = await run_client(
        smtp_source(server.addresses[0][1], "-s", "50", "-m", "2000", "-l", "1024")
    )
    assert status == 0, output
    assert_clean_maildir(mail, 2000)
    assert server.stats.messages == 2000
    assert server.stats.sessions_total == 2000
    assert server.stats.messages_refused == 0
    trace, content = split_trace(maildir_files(mail)[0])
    assert trace.startswith("Return-Path: <from@example.com>\r\n")
    assert "for <to@example.com>" in trace
    assert len(content) >= 1024


@needs(SMTP_SOURCE, "smtp-source", "postfix")
async def test_smtp_source_reused_sessions_discard(start_sink: StartSink) -> None:
    """smtp-source -d (keep each connection for the next message) against the discard store:
    500 messages over 10 sessions, all counted."""
    server = await start_sink()
    status, output = await run_client(
        smtp_source(server.addresses[0][1], "-d", "-s", "10", "-m", "500", "-l", "512")
    )
    assert status == 0, output
    assert server.stats.messages == 500
    assert server.stats.sessions_total == 10
    assert server.stats.bytes >= 500 * 512


@needs(SMTP_SOURCE, "smtp-source", "postfix")
async def test_smtp_source_file_stored_exactly(start_sink: StartSink, tmp_path: Path) -> None:
    """smtp-source -F sends a prepared file (dot-stuffed, LF turned into CRLF); every stored
    copy is exactly what it sent: the file with CRLF line endings, plus the empty line that
    smtp-source always puts before the final dot (seen on the wire: "end\r\n\r\n.\r\n")."""
    mail = tmp_path / "mail"
    server = await start_sink(store=f"maildir:{mail}")
    source = tmp_path / "message.txt"
    source.write_bytes(b"Subject: prepared\n\n.dot\n..dots\n.\nFrom x\nend\n")
    status, output = await run_client(
        smtp_source(server.addresses[0][1], "-d", "-s", "4", "-m", "40", "-F", str(source))
    )
    assert status == 0, output
    assert_clean_maildir(mail, 40)
    expected = source.read_bytes().replace(b"\n", b"\r\n") + b"\r\n"
    for raw in maildir_files(mail):
        trace, content = split_trace(raw)
        assert content == expected
        assert " with SMTP " in trace  # smtp-source greets with HELO
