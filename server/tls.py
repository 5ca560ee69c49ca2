"""Server-side TLS: building the SSL context from the configured certificate and key.

It turns every way a certificate can be unusable into one clear line for the operator.
"""

from __future__ import annotations

import os
import ssl

__all__ = ["TLSConfigError", "server_ssl_context"]


class TLSConfigError(ValueError):
    """The certificate or key cannot be used; the message is one line for the operator."""


def server_ssl_context(cert_file: str, key_file: str | None = None) -> ssl.SSLContext:
    """A server context with modern defaults (TLS 1.2+) for STARTTLS and implicit TLS."""
    for label, path in (("certificate", cert_file), ("key", key_file)):
        if path is not None and not os.access(path, os.R_OK):
            reason = "no such file" if not os.path.exists(path) else "permission denied"
            raise TLSConfigError(f"cannot read TLS {label} {path}: {reason}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"cannot use TLS certificate {cert_file}"
            f"{' with key ' + key_file if key_file else ''}: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"cannot load TLS certificate {cert_file}: {exc.strerror}") from None
    return context
