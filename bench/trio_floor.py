"""The trio floor: the least a trio SMTP sink can do, as a reference row in the bench.

No validation, no state machine, no limits, no storage: ``trio.serve_tcp``, one
``receive_some`` per wake-up, ``find`` for command lines and for the end of data, and the
replies to everything a read brought joined into one send. It answers smtp-source and
``mailstorm load`` correctly and nothing else, and must never be used as a server.

What it is for: the distance between ``mailstorm sink`` and this row is what mailstorm's
protocol layer, validation and bookkeeping cost on top of trio itself (issue 4 measured such
a sink at 3.6x aiosmtpd on pers100). It prints ``messages N`` when it stops (SIGTERM), as the
aiosmtpd baseline does, so the harness can check its count.

    python -m bench.trio_floor --port 2527
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio

_REPLIES = {
    b"EHLO": b"250-bench.sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
    b"HELO": b"250 bench.sink\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
    b"QUIT": b"221 2.0.0 Bye\r\n",
}
_UNKNOWN = b"502 5.5.2 Error: command not recognized\r\n"
_QUEUED = b"250 2.0.0 Ok: queued\r\n"
_END = b"\r\n.\r\n"


class Counter:
    """Messages accepted, for the harness's count check."""

    def __init__(self) -> None:
        self.messages = 0


async def _session(stream: trio.SocketStream, counter: Counter) -> None:
    buf = b""
    in_data = False
    try:
        await stream.send_all(b"220 bench.sink ESMTP trio-floor\r\n")
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
            out = []
            quit_ = False
            while True:
                if in_data:
                    end = buf.find(_END)
                    if end < 0:
                        break
                    buf = buf[end + 5 :]
                    in_data = False
                    counter.messages += 1
                    out.append(_QUEUED)
                    continue
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                verb = buf[:4].upper()
                buf = buf[nl + 1 :]
                out.append(_REPLIES.get(verb, _UNKNOWN))
                if verb == b"DATA":
                    in_data = True
                    buf = b"\r\n" + buf  # so that an empty body's "." still ends it
                elif verb == b"QUIT":
                    quit_ = True
                    break
            if out:
                await stream.send_all(b"".join(out))
            if quit_:
                return
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def _main(port: int, backlog: int) -> None:
    counter = Counter()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=backlog)

            async def handler(stream: trio.SocketStream) -> None:
                await _session(stream, counter)

            nursery.start_soon(trio.serve_listeners, handler, listeners)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    print(f"messages {counter.messages}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.trio_floor", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backlog", type=int, default=4096)
    args = p.parse_args(argv)
    trio.run(_main, args.port, args.backlog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
