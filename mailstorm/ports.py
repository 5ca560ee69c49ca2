"""Free loopback ports, for what starts a server of its own: the demo, the bench, the tests.

A port that was free a moment ago may be taken by the time it is used; every caller here
either binds it at once or reports the failure, so the race costs a clear error, not a hang.
"""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
