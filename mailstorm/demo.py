"""``mailstorm demo``: the main job in one command, a sink plus a short load run against it.

It starts ``mailstorm sink`` as a real subprocess storing to a temporary Maildir, runs
``mailstorm load`` against it, stops the sink with SIGTERM (a graceful shutdown), and checks
that the number of messages on disk equals the number the load generator saw acknowledged.
Only loopback is used. Exit status: 0 when the counts agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

from mailstorm.ports import free_port

__all__ = ["main"]

#: How long the sink may take to start listening.
STARTUP_TIMEOUT = 15.0


def _wait_listening(sink: subprocess.Popen[str]) -> None:
    """Read the sink's log up to its "listening" line, echoing it; then echo the rest from a
    thread. Watching the log rather than connecting keeps the sink's session count equal to
    the load generator's (a probe connection would be one more)."""
    assert sink.stderr is not None
    stderr = sink.stderr
    timer = threading.Timer(STARTUP_TIMEOUT, sink.kill)  # a sink that hangs at start-up
    timer.start()
    try:
        for line in stderr:
            sys.stderr.write(line)
            if " listening on " in line:
                break
        else:
            raise RuntimeError(f"the sink exited with status {sink.wait()} before listening")
    finally:
        timer.cancel()
    threading.Thread(target=_echo, args=(stderr,), daemon=True).start()


def _echo(stream: IO[str]) -> None:
    for line in stream:
        sys.stderr.write(line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mailstorm demo",
        description="Start a sink storing to a temporary Maildir, load it for a few seconds, "
        "print the load report, and check that what the sink stored equals what the load "
        "generator counted as delivered.",
    )
    p.add_argument("--sessions", type=int, default=50, help="concurrent sessions (default 50)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of load (default 5)")
    p.add_argument(
        "--size",
        default="1k:70,10k:25,100k:5",
        help="message size or size mix (default 1k:70,10k:25,100k:5)",
    )
    p.add_argument("--keep", metavar="DIR", help="store into DIR (kept) instead of a temp dir")
    args = p.parse_args(argv)

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mailstorm-demo-") as tmp:
        maildir = Path(args.keep) if args.keep else Path(tmp) / "Maildir"
        report = Path(tmp) / "report.json"
        sink_cmd = [
            sys.executable,
            "-m",
            "mailstorm.sink",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            f"maildir:{maildir}",
            "--hostname",
            "demo.sink",
        ]
        print(f"$ mailstorm sink --listen 127.0.0.1:{port} --store maildir:{maildir}", flush=True)
        sink = subprocess.Popen(sink_cmd, stderr=subprocess.PIPE, text=True)
        try:
            _wait_listening(sink)
            load_cmd = [
                sys.executable,
                "-m",
                "mailstorm.load",
                f"127.0.0.1:{port}",
                "--sessions",
                str(args.sessions),
                "--duration",
                str(args.duration),
                "--size",
                args.size,
                "--json",
                str(report),
            ]
            print(
                f"$ mailstorm load 127.0.0.1:{port} --sessions {args.sessions} "
                f"--duration {args.duration:g} --size {args.size}",
                flush=True,
            )
            load_status = subprocess.run(load_cmd, check=False).returncode
        finally:
            sink.send_signal(signal.SIGTERM)
            try:
                sink_status = sink.wait(timeout=30)
            except subprocess.TimeoutExpired:
                sink.kill()
                sink_status = sink.wait()
        stored = len(os.listdir(maildir / "new")) if (maildir / "new").is_dir() else 0
        delivered = _delivered(report)
    print(f"\nsink exit status {sink_status}; load exit status {load_status}")
    print(f"messages the load generator saw acknowledged: {delivered}")
    print(f"messages the sink stored in its Maildir:      {stored}")
    ok = delivered is not None and delivered == stored and sink_status == 0
    print("counts agree" if ok else "MISMATCH", flush=True)
    return 0 if ok and load_status == 0 else 1


def _delivered(report: Path) -> int | None:
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    totals = data.get("totals", {})
    value = totals.get("delivered")
    return int(value) if isinstance(value, int) else None
