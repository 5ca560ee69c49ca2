"""The blocking-socket driver (for scripts and Locust users) against aiosmtpd."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import pytest

from mailstorm.load.blocking import BlockingSession, SMTPSessionError, send_message
from mailstorm.wire.client import ClientConfig, Payload

pytest_plugins = ("load_fixtures",)


def test_send_message(aiosmtpd_server: Callable[..., Any]) -> None:
    server = aiosmtpd_server()
    body = b"Subject: hello\r\n\r\n.dot\r\nbody\r\n"
    result = send_message("127.0.0.1", server.port, "a@x.test", ["b@y.test", "c@y.test"], body)
    assert result.delivered and result.accepted_rcpts == 2
    assert result.failed_phase is None
    assert set(result.phases) == {"mail", "rcpt", "data", "eod"}
    # The whole message spans its phases: MAIL to the end-of-data reply.
    assert all(seconds >= 0 for seconds in result.phases.values())
    assert result.elapsed >= result.phases["mail"] + result.phases["eod"]
    assert server.handler.messages == 1
    assert server.handler.bodies[0] == body


def test_session_reuse_starttls_and_auth(
    aiosmtpd_server: Callable[..., Any], server_tls_context: ssl.SSLContext, ca_file: str
) -> None:
    server = aiosmtpd_server(tls_context=server_tls_context, auth=True)
    config = ClientConfig(
        starttls=True, auth_user="alice", auth_password="wonderland", auth_mech="LOGIN"
    )
    context = ssl.create_default_context(cafile=ca_file)
    payload = Payload(b"Subject: x\r\n\r\nhi\r\n")
    with BlockingSession(
        "127.0.0.1", server.port, config=config, ssl_context=context, server_hostname="localhost"
    ) as session:
        assert {"connect", "banner", "ehlo", "starttls", "tls", "auth"} <= set(session.setup_phases)
        results = [session.send("a@x.test", ["b@y.test"], payload) for _ in range(3)]
    assert all(r.delivered for r in results)
    assert server.handler.messages == 3


def test_refused_recipient_is_a_result_not_an_exception(
    aiosmtpd_server: Callable[..., Any],
) -> None:
    server = aiosmtpd_server()
    with BlockingSession("127.0.0.1", server.port) as session:
        result = session.send("a@x.test", ["refuse@y.test"], b"x\r\n")
        assert not result.delivered and result.failed_phase == "rcpt"
        assert result.reply is not None and result.reply.code >= 500
        assert session.send("a@x.test", ["b@y.test"], b"x\r\n").delivered


def test_session_failures_raise(aiosmtpd_server: Callable[..., Any], unused_port: int) -> None:
    with pytest.raises(SMTPSessionError) as info:
        send_message("127.0.0.1", unused_port, "a@x.test", ["b@y.test"], b"x\r\n")
    assert info.value.kind == "refused"
    server = aiosmtpd_server(auth=True)
    with pytest.raises(SMTPSessionError) as info:
        send_message(
            "127.0.0.1",
            server.port,
            "a@x.test",
            ["b@y.test"],
            b"x\r\n",
            config=ClientConfig(auth_user="alice", auth_password="nope"),
        )
    assert info.value.phase == "auth" and "535" in info.value.detail
