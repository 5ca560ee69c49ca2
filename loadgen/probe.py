"""The probe before a run: one TCP connection to the target, so a run against a server that is
down ends at once with one line instead of thousands of refused connects.

This module owns that check and its one-line message (``cannot connect to 127.0.0.1:2599:
connection refused``). It connects, and closes at once: it never speaks SMTP, never retries,
and never decides what the caller does with the answer (the CLI exits with
``TARGET_UNREACHABLE``). The run's report counts the probe apart from the run's connections.
"""

from __future__ import annotations

import socket
from typing import Any

from mailstorm.load.config import ConfigError, Target

__all__ = ["PROBE_TIMEOUT", "TargetUnreachable", "probe_target"]

#: The probe waits at most this long (or ``--timeout``, if shorter) for the connection.
PROBE_TIMEOUT = 10.0


class TargetUnreachable(Exception):
    """The probe could not connect; the text is the one line for the user."""


def _where(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{host}:{target.port}"


def probe_target(
    target: Target, timeout: float, source_address: str | None = None
) -> tuple[int, tuple[Any, ...]]:
    """Connect once to ``target`` (each address it resolves to, in order, until one accepts)
    and close; return the address family and socket address that accepted, for the run to
    use without probing again. Raises ``TargetUnreachable`` when none accepts within the
    timeout, and ``ConfigError`` (a usage error) for a name that does not resolve."""
    wait = min(timeout, PROBE_TIMEOUT)
    where = _where(target)
    try:
        infos = socket.getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ConfigError(f"cannot resolve {target.host!r}: {reason}") from None
    reason = "no address"
    for family, _, _, _, address in infos:
        if source_address is not None and (":" in source_address) != (
            family == socket.AF_INET6
        ):
            continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(wait)
        try:
            if source_address is not None:
                sock.bind((source_address, 0))
            sock.connect(address)
        except TimeoutError:
            reason = f"no answer within {wait:g}s"
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
        else:
            return family, address
        finally:
            sock.close()
    raise TargetUnreachable(f"cannot connect to {where}: {reason}")
