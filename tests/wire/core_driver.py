"""A stand-in for the sink's session driver, for tests that feed ``ServerConnection`` bytes.

It does what ``server/protocol.py`` and ``server/session.py`` do, without sockets: stores each
message (queue ids Q1, Q2, ...), checks passwords against ``USERS``, fakes the TLS handshake,
and sends whenever the core says its output is full (``OutputFull``), as the shell must.
"""

from __future__ import annotations

from mailstorm.wire.events import (
    AuthAttempt,
    Closed,
    MessageReceived,
    NeedData,
    OutputFull,
    StartTLS,
)
from mailstorm.wire.replies import ReplyParser
from mailstorm.wire.server import ServerConnection, SessionPolicy

POLICY = SessionPolicy(hostname="sink.test", max_size=1000, max_recipients=3, max_errors=10,
                       auth_enabled=True)
USERS = {"alice": "wonderland"}


class Driver:
    def __init__(self, policy: SessionPolicy = POLICY, *, tls: bool = False) -> None:
        self.conn = ServerConnection(policy, tls_active=tls)
        self.parser = ReplyParser()
        self.messages: list[MessageReceived] = []
        self.auths: list[AuthAttempt] = []
        self.closed = False
        self.tls_requests = 0
        #: The size of each send ``OutputFull`` asked for.
        self.full_sends: list[int] = []
        assert self.feed(b"")[0].startswith("220 sink.test")

    def feed(self, data: bytes | str) -> list[str]:
        """Send bytes; return the replies as ``"code text"`` strings (lines joined by |)."""
        if isinstance(data, str):
            data = data.encode()
        if data:
            self.conn.receive_data(data)
        sent = bytearray()
        while True:
            event = self.conn.next_event()
            if event is NeedData:
                break
            if event is OutputFull:
                out = self.conn.data_to_send()
                self.full_sends.append(len(out))
                sent += out
            elif isinstance(event, MessageReceived):
                self.messages.append(event)
                self.conn.message_stored(f"Q{len(self.messages)}")
            elif isinstance(event, AuthAttempt):
                self.auths.append(event)
                self.conn.auth_result(USERS.get(event.username) == event.password)
            elif isinstance(event, StartTLS):
                self.tls_requests += 1
                self.conn.tls_started()
            elif isinstance(event, Closed):
                self.closed = True
                break
        sent += self.conn.data_to_send()
        self.parser.feed(bytes(sent))
        replies = []
        while (reply := self.parser.next_reply()) is not None:
            replies.append(f"{reply.code} " + "|".join(reply.lines))
        return replies

    def one(self, line: str) -> str:
        replies = self.feed(line + "\r\n")
        assert len(replies) == 1, replies
        return replies[0]

    def transaction(self) -> None:
        assert self.one("EHLO client.example").startswith("250 ")
        assert self.one("MAIL FROM:<a@example.com>").startswith("250 2.1.0")
        assert self.one("RCPT TO:<b@example.com>").startswith("250 2.1.5")


def code(reply: str) -> str:
    """``"250 2.1.0"`` of ``"250 2.1.0 Ok"``."""
    return " ".join(reply.split(" ", 2)[:2])
