"""Property-based fuzzing of the sans-IO client: whatever a server sends, the client ends
cleanly (a session failure or close), never with an exception, and never sends after closing.

A load generator is pointed at servers nobody here wrote; a broken one must show up as
counted errors, not as a crashed run.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailstorm.wire.client import (
    ClientConfig,
    ClientConnection,
    Payload,
)
from mailstorm.wire.client_events import (
    MessageDone,
    NeedData,
    PhaseDone,
    ReadyForTLS,
    SessionClosed,
    SessionFailed,
    SessionReady,
)

_REPLIES = [
    b"220 ready\r\n", b"220-multi\r\n220 line\r\n", b"250 ok\r\n",
    b"250-srv\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n",
    b"354 go\r\n", b"334 \r\n", b"334 VXNlcm5hbWU6\r\n", b"235 ok\r\n", b"221 bye\r\n",
    b"421 closing\r\n", b"450 later\r\n", b"452 full\r\n", b"550 no\r\n", b"554 no\r\n",
    b"535 bad\r\n", b"503 seq\r\n", b"250-partial", b"\r\n", b"999 what\r\n", b"hello\r\n",
    b"2", b"50 ok\r\n", b"250 " + b"x" * 5000 + b"\r\n",
]
_replies = st.lists(st.sampled_from(_REPLIES) | st.binary(max_size=40), max_size=40)
_configs = st.builds(
    ClientConfig,
    lmtp=st.booleans(),
    starttls=st.booleans(),
    auth_user=st.sampled_from([None, "alice"]),
    auth_password=st.just("secret"),
    auth_mech=st.sampled_from(["PLAIN", "LOGIN"]),
    pipelining=st.sampled_from(["auto", "on", "off"]),
    chunking=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(config=_configs, replies=_replies, messages=st.integers(min_value=1, max_value=3))
def test_client_survives_any_server(
    config: ClientConfig, replies: list[bytes], messages: int
) -> None:
    conn = ClientConnection(config)
    conn.connection_made(0.0)
    payload = Payload(b"Subject: x\r\n\r\nbody\r\n")
    started = 0
    ended = False
    for i, chunk in enumerate([*replies, b""]):
        if ended:
            break
        conn.data_to_send(float(i))
        conn.receive_data(chunk, float(i))
        while (event := conn.next_event()) is not NeedData:
            if event == SessionReady() and started < messages:
                started += 1
                conn.start_message("a@b", ["c@d", "e@f"], payload)
            elif event == SessionReady():
                conn.quit()
            elif event == ReadyForTLS():
                conn.tls_started()
            elif isinstance(event, SessionFailed) or event == SessionClosed():
                ended = True
                break
            else:
                assert isinstance(event, MessageDone | PhaseDone), event
    # End of input always ends the session, one way or the other.
    assert ended or conn.is_closed
    assert conn.data_to_send(99.0) == b"" or not conn.is_closed


#: What a well-behaved server answers to each phase the client waits on.
_GOOD_REPLY = {
    "banner": [b"220 ready\r\n"],
    "ehlo": [
        b"250-srv\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n",
    ],
    "starttls": [b"220 go ahead\r\n"],
    "mail": [b"250 ok\r\n"],
    "rcpt": [b"250 ok\r\n"],
    "data": [b"354 go\r\n"],
    "bdat": [b"250 ok\r\n"],
    "eod": [b"250 queued\r\n"],
    "rset": [b"250 ok\r\n"],
    "quit": [b"221 bye\r\n"],
}


@settings(max_examples=300, deadline=None)
@given(config=_configs, data=st.data())
def test_client_survives_a_mostly_correct_server(config: ClientConfig, data: st.DataObject) -> None:
    """A server that usually answers right and sometimes misbehaves, at any depth."""
    conn = ClientConnection(config)
    conn.connection_made(0.0)
    payload = Payload(b"Subject: x\r\n\r\n.dot\r\nbody\r\n")
    started = delivered = 0
    ended = False
    # AUTH LOGIN asks twice (username, password) before the verdict; PLAIN answers at once.
    auth_steps = [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n"]
    if config.auth_mech == "PLAIN":
        auth_steps = []
    for step in range(80):
        conn.data_to_send(float(step))
        while (event := conn.next_event()) is not NeedData:
            if event == ReadyForTLS():
                conn.tls_started()
            elif isinstance(event, SessionFailed) or event == SessionClosed():
                ended = True
                break
            elif isinstance(event, MessageDone):
                delivered += event.delivered
            else:
                assert event == SessionReady() or isinstance(event, PhaseDone), event
        if ended:
            break
        if conn.is_ready:  # after the greeting, and after each MessageDone (as LoadSession)
            if started < 3:
                started += 1
                conn.start_message("a@b", ["c@d", "e@f"], payload)
            else:
                conn.quit()
        if conn.wants_to_send:
            continue
        phase = conn.pending_phase
        assert phase is not None, "the client waits for nothing but has not ended"
        if data.draw(st.integers(0, 24), label="fault?") == 0:
            reply = data.draw(st.sampled_from(_REPLIES) | st.binary(max_size=30), label="fault")
        elif phase == "auth":
            reply = auth_steps.pop(0) if auth_steps else b"235 ok\r\n"
        else:
            reply = data.draw(st.sampled_from(_GOOD_REPLY.get(phase, [b"250 ok\r\n"])),
                              label=phase)
        # b"" would mean end of input to the client, so only non-empty pieces are fed
        # (a fault of b"" is exactly that: the server closing).
        cut = data.draw(st.integers(0, len(reply)), label="split")
        for piece in (reply[:cut], reply[cut:]) if reply else (b"",):
            if piece or not reply:
                conn.receive_data(piece, float(step))
    # Three messages and a QUIT fit well within the steps: every session ends.
    assert ended
    assert delivered <= started
