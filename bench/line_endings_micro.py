"""What the DATA reader's line-ending check costs on large bodies, with no sockets.

``python -m bench.line_endings_micro`` times, on 100 KiB bodies of three kinds (prose, base64,
8-bit without line ends), the bare CR/LF check alone and a whole ``DataReader`` pass (end
marker scan, copy, check, unstuffing) over the body as one read, and prints microseconds per
body (best of several rounds, so machine noise counts less). Clean CRLF content is the case
that matters: it is nearly all real mail.
"""

from __future__ import annotations

import argparse
import base64
import random
import timeit
from collections.abc import Callable
from functools import partial

from mailstorm.wire.data import BareLinefeedPolicy, DataReader, has_bare_line_ending

SIZE = 100 * 1024


def bodies() -> dict[str, bytes]:
    """Clean CRLF bodies of about ``SIZE`` octets, each ending in CRLF, none dot-stuffed."""
    rng = random.Random(14)
    prose_line = b"The quick brown fox jumps over the lazy dog. Pack my box with jugs.\r\n"
    prose = prose_line * (SIZE // len(prose_line))
    b64 = base64.encodebytes(rng.randbytes(SIZE * 3 // 4)).replace(b"\n", b"\r\n")[:SIZE]
    b64 = b64[: b64.rfind(b"\r\n") + 2]
    eight_bit = bytes(rng.randrange(128, 256) for _ in range(SIZE)) + b"\r\n"
    return {"prose": prose, "base64": b64, "8-bit, one line": eight_bit}


def best_us(fn: Callable[[], object], number: int, rounds: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=rounds)) / number * 1e6


def read_whole(wire: bytes) -> None:
    buf = bytearray(wire)
    result = DataReader(0, BareLinefeedPolicy.REJECT).read(buf)
    assert result is not None and result[1] is None


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.line_endings_micro", description=__doc__)
    p.add_argument("--number", type=int, default=500)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    for name, body in bodies().items():
        wire = body + b".\r\n"
        check = best_us(partial(has_bare_line_ending, body), args.number, args.rounds)
        reader = best_us(partial(read_whole, wire), args.number, args.rounds)
        print(f"{name:16} {len(body):7} octets: bare CR/LF check {check:6.1f} us, "
              f"DataReader {reader:6.1f} us")


if __name__ == "__main__":
    main()
