"""STARTTLS and implicit TLS over real sockets, with trustme certificates.

Covers what the EHLO reply advertises in each TLS state, the RFC 3207 reset after the
handshake, AUTH's encryption requirement (538 5.7.11), the CVE-2011-0411 plaintext command
injection, the implicit-TLS listener, and clients that break the handshake.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import TEST_TIMEOUT, SMTPClient, TLSFiles, b64

from mailstorm.sink import Address, SinkServer

Connect = Callable[..., Awaitable[SMTPClient]]
StartSink = Callable[..., Awaitable[SinkServer]]

ALICE_PLAIN = "AUTH PLAIN " + b64("\0alice\0wonderland")


def keywords(reply: Any) -> list[str]:
    """The EHLO keyword lines (every line after the greeting), upper-cased."""
    assert reply.code == 250, reply
    return [line.upper() for line in reply.lines[1:]]


async def tls_sink(start_sink: StartSink, tls_files: TLSFiles, **overrides: Any) -> SinkServer:
    return await start_sink(tls_cert=str(tls_files.cert), tls_key=str(tls_files.key), **overrides)


async def upgrade(client: SMTPClient, tls_files: TLSFiles) -> None:
    """EHLO, STARTTLS (220) and the handshake."""
    await client.cmd("EHLO client.test")
    reply = await client.cmd("STARTTLS")
    assert (reply.code, reply.enhanced) == (220, "2.0.0"), reply
    await client.starttls(tls_files.client_context())


async def send_message(client: SMTPClient) -> None:
    """One complete transaction on an already greeted session, every reply positive."""
    assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await client.cmd("RCPT TO:<b@example.org>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    reply = await client.cmd("Subject: t\r\n\r\nhello\r\n.")
    assert reply.code == 250, reply


# ---- advertising ------------------------------------------------------------------------


async def test_no_starttls_without_certificate(start_sink: StartSink, connect: Connect) -> None:
    """Without a certificate STARTTLS is not advertised and the command gets 454 4.7.0."""
    server = await start_sink()
    client = await connect(server.addresses[0])
    assert "STARTTLS" not in keywords(await client.cmd("EHLO client.test"))
    reply = await client.cmd("STARTTLS")
    assert (reply.code, reply.enhanced) == (454, "4.7.0"), reply
    # The session is still usable in plaintext.
    await send_message(client)


async def test_starttls_advertised_only_before_tls(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles, auth_file: Path
) -> None:
    """With a certificate STARTTLS is offered in plaintext, and not after the upgrade, where
    AUTH appears instead (auth file configured, no --insecure-auth)."""
    server = await tls_sink(start_sink, tls_files, auth_file=str(auth_file))
    client = await connect(server.addresses[0])
    before = keywords(await client.cmd("EHLO client.test"))
    assert "STARTTLS" in before
    assert not any(k.startswith("AUTH") for k in before)
    assert (await client.cmd("STARTTLS")).code == 220
    await client.starttls(tls_files.client_context())
    after = keywords(await client.cmd("EHLO client.test"))
    assert "STARTTLS" not in after
    assert "AUTH PLAIN LOGIN" in after
    reply = await client.cmd(ALICE_PLAIN)
    assert (reply.code, reply.enhanced) == (235, "2.7.0"), reply
    await send_message(client)
    assert server.stats.tls_sessions == 1


async def test_auth_before_starttls_needs_encryption(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles, auth_file: Path
) -> None:
    """With TLS configured, AUTH PLAIN and AUTH LOGIN in plaintext get 538 5.7.11 and no
    credentials are checked."""
    server = await tls_sink(start_sink, tls_files, auth_file=str(auth_file))
    client = await connect(server.addresses[0])
    await client.cmd("EHLO client.test")
    for command in (ALICE_PLAIN, "AUTH LOGIN", "AUTH PLAIN"):
        reply = await client.cmd(command)
        assert (reply.code, reply.enhanced) == (538, "5.7.11"), (command, reply)
    assert server.stats.auth_failures == 0
    # Still a plain, working session; and after the upgrade the same AUTH succeeds.
    assert (await client.cmd("NOOP")).code == 250
    assert (await client.cmd("STARTTLS")).code == 220
    await client.starttls(tls_files.client_context())
    await client.cmd("EHLO client.test")
    assert (await client.cmd(ALICE_PLAIN)).code == 235


async def test_insecure_auth_allows_auth_before_tls(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles, auth_file: Path
) -> None:
    """``insecure_auth=True`` offers AUTH (and still STARTTLS) in plaintext, and AUTH works."""
    server = await tls_sink(start_sink, tls_files, auth_file=str(auth_file), insecure_auth=True)
    client = await connect(server.addresses[0])
    offered = keywords(await client.cmd("EHLO client.test"))
    assert "AUTH PLAIN LOGIN" in offered and "STARTTLS" in offered
    reply = await client.cmd("AUTH LOGIN")
    assert (reply.code, reply.lines) == (334, ["VXNlcm5hbWU6"]), reply
    assert (await client.cmd(b64("bob"))).code == 334
    reply = await client.cmd(b64("pa:ss word"))
    assert (reply.code, reply.enhanced) == (235, "2.7.0"), reply


async def test_auth_without_tls_configured_works_in_plaintext(
    start_sink: StartSink, connect: Connect, auth_file: Path
) -> None:
    """With no certificate at all, AUTH is offered and works on plaintext."""
    server = await start_sink(auth_file=str(auth_file))
    assert server.credentials_on_plaintext()
    client = await connect(server.addresses[0])
    assert "AUTH PLAIN LOGIN" in keywords(await client.cmd("EHLO client.test"))
    assert (await client.cmd(ALICE_PLAIN)).code == 235


async def test_certificate_and_key_in_one_file(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A PEM file holding both the key and the chain works as the certificate alone."""
    combined = tmp_path / "combined.pem"
    combined.write_bytes(tls_files.key.read_bytes() + tls_files.cert.read_bytes())
    server = await start_sink(tls_cert=str(combined))
    client = await connect(server.addresses[0])
    await upgrade(client, tls_files)
    await client.cmd("EHLO client.test")
    await send_message(client)


# ---- the RFC 3207 reset -----------------------------------------------------------------


async def test_mail_after_starttls_needs_new_ehlo(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles
) -> None:
    """After the handshake the session starts over: MAIL before a new EHLO gets 503."""
    server = await tls_sink(start_sink, tls_files)
    client = await connect(server.addresses[0])
    await upgrade(client, tls_files)
    reply = await client.cmd("MAIL FROM:<a@example.org>")
    assert (reply.code, reply.enhanced) == (503, "5.5.1"), reply
    await client.cmd("EHLO client.test")
    await send_message(client)


async def test_starttls_is_refused_inside_a_transaction(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles
) -> None:
    """STARTTLS after MAIL gets 503 5.5.1 (as from Postfix) instead of silently dropping the
    envelope (RFC 3207 4.2); the transaction goes on in plaintext."""
    server = await tls_sink(start_sink, tls_files)
    client = await connect(server.addresses[0])
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
    reply = await client.cmd("STARTTLS")
    assert (reply.code, reply.enhanced) == (503, "5.5.1"), reply
    assert (await client.cmd("RCPT TO:<b@example.org>")).code == 250


async def test_starttls_forgets_authentication(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles, auth_file: Path
) -> None:
    """An AUTH done in plaintext (insecure_auth) is forgotten by STARTTLS: with auth
    required, MAIL over TLS gets 530 until the client authenticates again."""
    server = await tls_sink(
        start_sink, tls_files, auth_file=str(auth_file), insecure_auth=True, auth_required=True
    )
    client = await connect(server.addresses[0])
    await client.cmd("EHLO client.test")
    assert (await client.cmd(ALICE_PLAIN)).code == 235
    assert (await client.cmd("STARTTLS")).code == 220
    await client.starttls(tls_files.client_context())
    await client.cmd("EHLO client.test")
    reply = await client.cmd("MAIL FROM:<a@example.org>")
    assert (reply.code, reply.enhanced) == (530, "5.7.0"), reply
    # Not "503 already authenticated": the old AUTH state is gone.
    assert (await client.cmd(ALICE_PLAIN)).code == 235
    await send_message(client)


async def test_starttls_twice_is_refused(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles
) -> None:
    """A second STARTTLS inside TLS gets 503 and the TLS session goes on."""
    server = await tls_sink(start_sink, tls_files)
    client = await connect(server.addresses[0])
    await upgrade(client, tls_files)
    await client.cmd("EHLO client.test")
    reply = await client.cmd("STARTTLS")
    assert (reply.code, reply.enhanced) == (503, "5.5.1"), reply
    await send_message(client)


# ---- CVE-2011-0411: plaintext pipelined after STARTTLS ----------------------------------

INJECTIONS = [
    "RSET\r\n",
    "MAIL FROM:<evil@x>\r\n",
    "EHLO evil\r\nMAIL FROM:<evil@x>\r\n",
    "NOOP\r\nNOOP\r\nNOOP\r\n",
]


@pytest.mark.parametrize("injected", INJECTIONS)
async def test_starttls_injection_is_discarded(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles, injected: str
) -> None:
    """Commands sent in the same packet as STARTTLS are never executed or answered: after the
    220 the first reply over TLS is the one to our first TLS command, and a following RCPT
    gets 503 need MAIL (an injected MAIL was not accepted)."""
    server = await tls_sink(start_sink, tls_files)
    client = await connect(server.addresses[0])
    await client.cmd("EHLO client.test")
    await client.send("STARTTLS\r\n" + injected)
    reply = await client.reply()
    assert (reply.code, reply.enhanced) == (220, "2.0.0"), reply
    # Nothing else came in plaintext after the 220.
    assert client.parser.buffered == 0
    assert client.parser.next_reply() is None
    await client.starttls(tls_files.client_context())

    # NOOP first: if anything injected had been answered, that answer would come before
    # the NOOP's "250 2.0.0 OK".
    reply = await client.cmd("NOOP")
    assert (reply.code, reply.lines) == (250, ["2.0.0 OK"]), reply
    ehlo = await client.cmd("EHLO client.test")
    assert ehlo.code == 250 and ehlo.lines[0] == "sink.test", ehlo
    reply = await client.cmd("RCPT TO:<b@example.org>")
    assert reply.code == 503 and "need MAIL" in reply.text, reply
    assert (await client.cmd("QUIT")).code == 221
    await client.expect_closed()
    # No stray reply arrived before the close either.
    assert client.parser.next_reply() is None
    assert server.stats.messages == 0


# ---- implicit TLS -----------------------------------------------------------------------


async def open_implicit_tls(address: tuple[str, int], tls_files: TLSFiles) -> SMTPClient:
    client = await SMTPClient.connect(address)
    await client.starttls(tls_files.client_context())
    return client


async def test_implicit_tls_listener(
    start_sink: StartSink, tls_files: TLSFiles, auth_file: Path
) -> None:
    """A ``tls_listen`` address speaks TLS from the first byte: banner over TLS, no STARTTLS
    offered, AUTH offered, STARTTLS refused with 503, and mail is accepted."""
    server = await tls_sink(
        start_sink,
        tls_files,
        auth_file=str(auth_file),
        tls_listen=(Address("127.0.0.1", 0),),
    )
    assert len(server.tls_addresses) == 1
    assert server.tls_addresses[0] not in server.addresses
    client = await open_implicit_tls(server.tls_addresses[0], tls_files)
    try:
        assert (await client.reply()).code == 220
        offered = keywords(await client.cmd("EHLO client.test"))
        assert "STARTTLS" not in offered and "AUTH PLAIN LOGIN" in offered
        assert (await client.cmd("STARTTLS")).code == 503
        assert (await client.cmd(ALICE_PLAIN)).code == 235
        await send_message(client)
    finally:
        await client.aclose()
    assert server.stats.tls_sessions == 1
    assert server.stats.messages == 1


async def test_plaintext_client_on_implicit_tls_listener(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles
) -> None:
    """A client speaking plain SMTP to the TLS port is dropped without a reply, and the
    server goes on serving both listeners."""
    server = await tls_sink(start_sink, tls_files, tls_listen=(Address("127.0.0.1", 0),))
    bad = await connect(server.tls_addresses[0], banner=False)
    await bad.send("EHLO client.test\r\n")
    await bad.expect_closed()
    assert bad.parser.next_reply() is None

    good = await open_implicit_tls(server.tls_addresses[0], tls_files)
    try:
        assert (await good.reply()).code == 220
        await good.cmd("EHLO client.test")
        await send_message(good)
    finally:
        await good.aclose()
    plain = await connect(server.addresses[0])
    await plain.cmd("EHLO client.test")
    await send_message(plain)


# ---- broken handshakes --------------------------------------------------------------------


async def test_garbage_after_starttls_does_not_hurt_server(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles
) -> None:
    """A client that answers the 220 with garbage instead of a ClientHello is disconnected;
    other sessions, running and new, are unaffected."""
    server = await tls_sink(start_sink, tls_files)
    bystander = await connect(server.addresses[0])
    await bystander.cmd("EHLO client.test")

    bad = await connect(server.addresses[0])
    await bad.cmd("EHLO client.test")
    assert (await bad.cmd("STARTTLS")).code == 220
    await bad.send(b"this is not a TLS ClientHello\r\n" * 8)
    await bad.expect_closed()

    await send_message(bystander)
    fresh = await connect(server.addresses[0])
    await upgrade(fresh, tls_files)
    await fresh.cmd("EHLO client.test")
    await send_message(fresh)
    assert server.stats.messages == 2


async def test_client_vanishing_mid_handshake(
    start_sink: StartSink, connect: Connect, tls_files: TLSFiles
) -> None:
    """A client that closes right after the 220, or one whose certificate check fails, does
    not break the server."""
    server = await tls_sink(start_sink, tls_files)
    quitter = await connect(server.addresses[0])
    await quitter.cmd("EHLO client.test")
    assert (await quitter.cmd("STARTTLS")).code == 220
    await quitter.aclose()

    # A client that does not trust the certificate aborts the handshake itself.
    distrustful = await connect(server.addresses[0])
    await distrustful.cmd("EHLO client.test")
    assert (await distrustful.cmd("STARTTLS")).code == 220
    with pytest.raises(trio.BrokenResourceError):
        await distrustful.starttls(ssl.create_default_context())

    with trio.fail_after(TEST_TIMEOUT):
        fresh = await connect(server.addresses[0])
    await upgrade(fresh, tls_files)
    await fresh.cmd("EHLO client.test")
    await send_message(fresh)
