"""aiosmtpd on plain asyncio as a discarding, counting sink: the Python baseline of the bench.

Usage::

    python -m bench.aiosmtpd_sink --port 2526 [--host 127.0.0.1] [--backlog 4096]

It prints ``listening HOST:PORT`` once it accepts connections, and on SIGTERM or SIGINT
``messages N`` (messages whose end of data got a 250) before it exits. The hostname is fixed
so aiosmtpd never calls ``socket.getfqdn()`` (no DNS).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal

from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["CountingHandler", "main"]

HOSTNAME = "bench.sink"


class CountingHandler:
    """Accepts every message, keeps nothing, counts them."""

    def __init__(self) -> None:
        self.messages = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Count the message and accept it."""
        self.messages += 1
        return "250 2.0.0 OK"


def _raise_nofile() -> None:
    """Every session is a file descriptor: raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(host: str, port: int, backlog: int) -> int:
    """Serve until SIGTERM/SIGINT; return the number of messages accepted."""
    loop = asyncio.get_running_loop()
    handler = CountingHandler()

    def factory() -> SMTP:
        return SMTP(handler, hostname=HOSTNAME, ident="aiosmtpd bench sink")

    server = await loop.create_server(factory, host, port, backlog=backlog)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening {host}:{port}", flush=True)
    await stop.wait()
    server.close()
    return handler.messages


def main(argv: list[str] | None = None) -> int:
    """Run the sink; print its message count when stopped."""
    parser = argparse.ArgumentParser(prog="python -m bench.aiosmtpd_sink", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args(argv)
    _raise_nofile()
    messages = asyncio.run(serve(args.host, args.port, args.backlog))
    print(f"messages {messages}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
