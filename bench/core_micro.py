"""The sans-IO core's own cost per message, with no sockets and no event loop.

``python -m bench.core_micro`` feeds ``ServerConnection`` the four exchanges of a
non-pipelined transaction (MAIL, RCPT, DATA, a 1 KiB body) the way the trio shell does, and
prints microseconds per message (best of several rounds, so machine noise counts less). It is
the number to watch when changing the grammar, the dispatcher or the DATA reader.
"""

from __future__ import annotations

import argparse
import time

from mailstorm.wire.events import NeedData
from mailstorm.wire.server import ServerConnection, SessionPolicy

BODY = b"Subject: bench\r\n\r\n" + b"y" * 1000 + b"\r\n.\r\n"
EXCHANGES = [b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.com>\r\n", b"DATA\r\n", BODY]


def per_message_us(messages: int) -> float:
    """Microseconds per message for one round of ``messages`` transactions."""
    conn = ServerConnection(SessionPolicy(hostname="bench"))
    conn.receive_data(b"EHLO bench\r\n")
    conn.next_event()
    conn.data_to_send()
    started = time.perf_counter()
    for _ in range(messages):
        for chunk in EXCHANGES:
            conn.receive_data(chunk)
            while conn.next_event() is not NeedData:
                conn.message_stored("Q")
            conn.data_to_send()
    return (time.perf_counter() - started) / messages * 1e6


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.core_micro", description=__doc__)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    best = min(per_message_us(args.messages) for _ in range(args.rounds))
    print(f"sans-IO core: {best:.1f} us per message (MAIL, RCPT, DATA, 1 KiB body)")


if __name__ == "__main__":
    main()
