"""The servers under test: find them, start each on a free loopback port, stop it, read its count.

Every server runs under coreutils ``timeout`` (so it ends even if the harness is killed),
listens on 127.0.0.1 only, writes its output to a log file, and is stopped with SIGTERM sent
to its own PID (SIGKILL if it does not exit in time). On the way out each one reports how
many messages it accepted:

- ``mailstorm``: ``mailstorm sink`` (discard store), the ``stopped: ... messages N`` log line
- ``aiosmtpd``: ``bench/aiosmtpd_sink.py`` on asyncio, its ``messages N`` line
- ``smtp-sink``: Postfix ``smtp-sink -c``, the last ``mesg=N`` of its running counters
- ``node``: node's ``smtp-server`` via ``bench/node/sink.js``, its ``messages N`` line
- ``trio-floor``: ``bench/trio_floor.py``, the least a trio sink can do (a reference row, not a
  server), its ``messages N`` line
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mailstorm.ports import free_port

__all__ = [
    "SERVER_NAMES",
    "RunningServer",
    "ServerSpec",
    "bounded",
    "discover_servers",
    "listen_backlog",
    "start_server",
]

HOST = "127.0.0.1"
#: ``mailstorm-w2`` is the sink with ``--workers 2`` (the 1-to-2 worker scaling of issue 4).
#: ``trio-floor`` is the issue's "60-line trio sink": what trio alone costs, for reference.
SERVER_NAMES = ("mailstorm", "mailstorm-w2", "aiosmtpd", "smtp-sink", "node", "trio-floor")
BENCH_DIR = Path(__file__).resolve().parent
NODE_SINK = BENCH_DIR / "node" / "sink.js"
#: How long a server may take to accept its first connection.
STARTUP_TIMEOUT = 20.0
#: How long a server may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 15.0

_COUNT_PATTERNS = {
    "mailstorm": re.compile(rb"stopped: .*?messages (\d+)"),
    # The supervisor's own final line sums its workers' counters (it is printed last).
    "mailstorm-w2": re.compile(rb"stopped: 2 workers: .*?messages (\d+)"),
    "aiosmtpd": re.compile(rb"^messages (\d+)", re.MULTILINE),
    "smtp-sink": re.compile(rb"mesg=(\d+)"),
    "node": re.compile(rb"^messages (\d+)", re.MULTILINE),
    "trio-floor": re.compile(rb"^messages (\d+)", re.MULTILINE),
}


@dataclass
class ServerSpec:
    """A server the bench knows, and whether it can run on this machine."""

    name: str
    available: bool
    reason: str | None = None
    version: str | None = None


@dataclass
class RunningServer:
    """A started server; ``stop()`` ends it and returns its message count.

    ``proc`` is the ``timeout`` wrapper that bounds the server's lifetime even if the harness
    dies; ``pid`` is the server process itself (the wrapper's only child).
    """

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    pid: int
    log_path: Path
    command: list[str] = field(default_factory=list)

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL), wait, and return the count it printed (None if none)."""
        if self.proc.poll() is None:
            _signal(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _signal(self.pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        return self.message_count()

    def message_count(self) -> int | None:
        """The last message count found in the server's output."""
        matches = _COUNT_PATTERNS[self.name].findall(self.log_path.read_bytes())
        return int(matches[-1]) if matches else None

    def log_tail(self, lines: int = 5) -> str:
        """The last non-empty lines of the server's output, for error messages."""
        text = self.log_path.read_bytes().replace(b"\r", b"\n").decode("utf-8", "replace")
        kept = [line for line in text.splitlines() if line.strip()]
        return " | ".join(kept[-lines:])[-1000:]


def listen_backlog() -> int:
    """The listen backlog every server gets: the kernel's cap (net.core.somaxconn)."""
    try:
        return min(65535, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    except (OSError, ValueError):
        return 4096


def _smtp_sink_path() -> str | None:
    return shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if os.access("/usr/sbin/smtp-sink", os.X_OK) else None
    )


def _check_output(cmd: list[str]) -> tuple[int, str]:
    """Run a short check command; (exit status, its output stripped)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return done.returncode, (done.stdout + done.stderr).strip()


def _mailstorm_spec(name: str = "mailstorm") -> ServerSpec:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return ServerSpec(name, True, version=version("mailstorm"))
    except PackageNotFoundError:
        return ServerSpec(name, True, version="(not installed, from source)")


def _aiosmtpd_spec() -> ServerSpec:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return ServerSpec("aiosmtpd", True, version=f"{version('aiosmtpd')} on asyncio")
    except PackageNotFoundError:
        return ServerSpec("aiosmtpd", False, "aiosmtpd is not installed (pip install '.[bench]')")


def _smtp_sink_spec() -> ServerSpec:
    if _smtp_sink_path() is None:
        return ServerSpec("smtp-sink", False, "Postfix smtp-sink not found (apt: postfix)")
    status, out = _check_output(["postconf", "-d", "-h", "mail_version"])
    return ServerSpec("smtp-sink", True, version=f"Postfix {out}" if status == 0 else None)


#: How long ``npm ci`` may take to install node's smtp-server for a full run.
NPM_INSTALL_TIMEOUT = 300


def _node_spec(install: bool = False) -> ServerSpec:
    """node's smtp-server, when node is here; with ``install``, npm installs it if missing."""
    node = shutil.which("node")
    if node is None:
        return ServerSpec("node", False, "node is not installed")
    status, out = _check_output([node, str(NODE_SINK), "--check"])
    npm = shutil.which("npm")
    if status != 0 and install and npm is not None:
        # The issue asks for node's row wherever Node.js is: the pinned version, from the
        # lock file, into bench/node/node_modules (git-ignored).
        print("installing node's smtp-server: npm ci --prefix bench/node", flush=True)
        try:
            subprocess.run(
                [npm, "ci", "--prefix", str(NODE_SINK.parent), "--no-audit", "--no-fund"],
                capture_output=True, timeout=NPM_INSTALL_TIMEOUT, check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"npm ci failed: {exc}", flush=True)
        status, out = _check_output([node, str(NODE_SINK), "--check"])
    if status != 0:
        why = out.splitlines()[-1] if out else f"exit status {status}"
        return ServerSpec("node", False, f"{why} (npm ci --prefix bench/node)")
    _, node_version = _check_output([node, "--version"])
    return ServerSpec("node", True, version=f"smtp-server {out} on node {node_version}")


def _trio_floor_spec() -> ServerSpec:
    from importlib.metadata import version

    return ServerSpec("trio-floor", True, version=f"trio {version('trio')}, no protocol layer")


def discover_servers(
    wanted: tuple[str, ...] = SERVER_NAMES, *, install: bool = False
) -> dict[str, ServerSpec]:
    """Which of the ``wanted`` servers can run here, with versions or the reason why not.

    With ``install``, a missing node smtp-server is installed with npm where node is present.
    """
    finders = {
        "mailstorm": _mailstorm_spec,
        "mailstorm-w2": lambda: _mailstorm_spec("mailstorm-w2"),
        "aiosmtpd": _aiosmtpd_spec,
        "smtp-sink": _smtp_sink_spec,
        "node": lambda: _node_spec(install),
        "trio-floor": _trio_floor_spec,
    }
    return {name: finders[name]() for name in wanted}


def _command(name: str, port: int, max_sessions: int) -> list[str]:
    """The command line that starts server ``name`` on 127.0.0.1:``port``."""
    backlog = listen_backlog()
    if name in ("mailstorm", "mailstorm-w2"):
        workers = ["--workers", "2"] if name == "mailstorm-w2" else []
        return [
            sys.executable, "-m", "mailstorm", "sink",
            "--listen", f"{HOST}:{port}", "--hostname", "bench.sink", "--store", "discard",
            "--max-connections", str(max_sessions), "--grace-period", "1", *workers,
        ]
    if name == "aiosmtpd":
        return [
            sys.executable, "-m", "bench.aiosmtpd_sink",
            "--host", HOST, "--port", str(port), "--backlog", str(backlog),
        ]
    if name == "smtp-sink":
        sink = _smtp_sink_path() or "smtp-sink"
        # -u is required (and only allowed) when running as root; -c prints counters;
        # -m raises the concurrent-session cap (default 256) above the session count.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        return [
            sink, *user, "-c", "-h", "bench.sink", "-m", str(max_sessions),
            f"{HOST}:{port}", str(backlog),
        ]
    if name == "node":
        return [shutil.which("node") or "node", str(NODE_SINK), str(port), str(backlog),
                str(max_sessions)]
    if name == "trio-floor":
        return [sys.executable, "-m", "bench.trio_floor", "--port", str(port),
                "--backlog", str(backlog)]
    raise ValueError(f"unknown server {name!r}")


def _wait_greeting(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the server answers a connection with its greeting, then say QUIT."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} during start-up")
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    sock.recv(512)
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"not greeting on {HOST}:{port} after {STARTUP_TIMEOUT:g}s")


def _signal(pid: int, signum: int) -> None:
    """Send ``signum`` to ``pid`` if it still exists."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _only_child(pid: int) -> int:
    """The child process of ``pid`` (the server under its ``timeout`` wrapper)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    path = Path(f"/proc/{pid}/task/{pid}/children")
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            children = path.read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.01)
    raise RuntimeError("the server process did not appear")


def bounded(command: list[str], seconds: float) -> list[str]:
    """``command`` under coreutils ``timeout``: SIGTERM after ``seconds``, SIGKILL 5 s later."""
    return ["timeout", "-k", "5", f"{seconds:.0f}", *command]


def start_server(
    name: str, workdir: Path, label: str, max_sessions: int, lifetime: float
) -> RunningServer:
    """Start server ``name`` on a free loopback port and wait for its first greeting.

    Its output goes to ``workdir/<label>.log``. ``max_sessions`` is the largest number of
    sessions the run will hold at once; the server's limit is set above it. Whatever happens
    to the harness, the server is ended after ``lifetime`` seconds.
    """
    port = free_port(HOST)
    command = _command(name, port, max_sessions + 1000)
    log_path = workdir / f"{label}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            bounded(command, lifetime),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=BENCH_DIR.parent,
            start_new_session=True,  # a ^C to the harness does not hit the server mid-run
        )
    try:
        pid = _only_child(proc.pid)
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise
    server = RunningServer(name, port, proc, pid, log_path, command)
    try:
        _wait_greeting(port, proc)
    except BaseException:
        server.stop()
        raise
    return server
