"""Property-based fuzzing of the sans-IO server: any input, in any split, is survived.

Whatever a peer sends, ``ServerConnection`` must never raise, must only emit well-formed
replies, must keep its receive buffer bounded (and, with a bound on unsent output, its output
too), and must never hand over a message larger than the limit. Inputs mix protocol fragments
(so that deep states are reached) with raw bytes.
"""

from __future__ import annotations

import base64
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from mailstorm.wire.events import (
    AuthAttempt,
    Closed,
    MessageReceived,
    MessageRefused,
    NeedData,
    OutputFull,
    StartTLS,
)
from mailstorm.wire.replies import ReplyParser
from mailstorm.wire.server import MAX_AUTH_LINE, ServerConnection, SessionPolicy

#: More than any one reply the server sends (the HELP and EHLO replies are the longest).
LONGEST_REPLY = 512

MAX_SIZE = 2000
POLICY = SessionPolicy(hostname="fuzz.test", max_size=MAX_SIZE, max_recipients=5,
                       max_errors=50, auth_enabled=True, tls_available=True,
                       insecure_auth=True)

_FRAGMENTS = [
    b"EHLO x\r\n", b"HELO x\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b> SIZE=10\r\n",
    b"MAIL FROM:<> BODY=8BITMIME SMTPUTF8\r\n", b"RCPT TO:<c@d>\r\n", b"RCPT TO:<Postmaster>\r\n",
    b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT 0 LAST\r\n", b"BDAT 99999\r\n",
    b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"VRFY x\r\n", b"EXPN x\r\n", b"HELP\r\n",
    b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n",
    b"AUTH PLAIN " + base64.b64encode(b"\0u\0p") + b"\r\n", base64.b64encode(b"u") + b"\r\n",
    b"*\r\n", b".\r\n", b"\r\n.\r\n", b"..\r\n", b"\n.\n", b"\r\n", b"\n", b"\r", b".",
    b"x" * 600 + b"\r\n", b"y" * 3000, b"\xff\xfe\r\n", b"\x00",
]
_chunks = st.lists(st.sampled_from(_FRAGMENTS) | st.binary(max_size=64), max_size=60)


@settings(max_examples=300, deadline=None)
@given(chunks=_chunks, auth_ok=st.booleans(), store_ok=st.booleans(),
       unsent_bound=st.sampled_from([0, 1, 300, 4096]))
def test_server_survives_any_input(
    chunks: list[bytes], auth_ok: bool, store_ok: bool, unsent_bound: int
) -> None:
    conn = ServerConnection(replace(POLICY, max_unsent_output=unsent_bound))
    parser = ReplyParser()
    closed = False
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            if event is NeedData:
                break
            if event is OutputFull:
                # Parsing stopped at the bound, within one reply (two when the last ends
                # the session with 421) of it.
                out = conn.data_to_send()
                assert unsent_bound <= len(out) < unsent_bound + 2 * LONGEST_REPLY
                parser.feed(out)
            elif isinstance(event, MessageReceived):
                assert len(event.content) <= MAX_SIZE
                if store_ok:
                    conn.message_stored("Q1")
                else:
                    conn.message_failed()
            elif isinstance(event, AuthAttempt):
                conn.auth_result(auth_ok)
            elif isinstance(event, StartTLS):
                conn.tls_started()
            elif isinstance(event, MessageRefused):
                pass  # its reply is already queued
            else:
                assert isinstance(event, Closed)
                closed = True
                break
        # Every reply is well formed (the parser raises on anything else).
        parser.feed(conn.data_to_send())
        while parser.next_reply() is not None:
            pass
        # Bounded: a partial command line, or a body within the size limit plus slack.
        assert len(conn._buf) <= max(MAX_AUTH_LINE, MAX_SIZE + (MAX_SIZE >> 3) + 4096) + 64
        if closed:
            break
    assert closed, "end of input must end the session"
    assert parser.buffered == 0
