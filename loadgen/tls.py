"""The client TLS context for smtps:// and --starttls.

This module owns how the load generator verifies servers. The default is NOT to verify: load
tests usually target test servers with self-signed certificates, and the handshake cost is the
same either way. ``--tls-verify`` (system CAs) or ``--ca-file`` turn verification on. It never
does I/O beyond reading the CA file.
"""

from __future__ import annotations

import ssl

__all__ = ["client_ssl_context"]


def client_ssl_context(*, verify: bool = False, ca_file: str | None = None) -> ssl.SSLContext:
    """One context for every connection of a process (contexts are costly to build)."""
    if verify or ca_file:
        ctx = ssl.create_default_context(cafile=ca_file)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
