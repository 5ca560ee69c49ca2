"""Server-side TLS: building the SSL context from the configured certificate and key.

It turns every way a certificate can be unusable into one clear line for the operator.
"""

from __future__ import annotations

import os
import re
import ssl

__all__ = ["TLSConfigError", "server_ssl_context"]

_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


class TLSConfigError(ValueError):
    """The certificate or key cannot be used; the message is one line for the operator."""


def server_ssl_context(cert_file: str, key_file: str | None = None) -> ssl.SSLContext:
    """A server context with modern defaults (TLS 1.2+) for STARTTLS and implicit TLS."""
    for label, path in (("certificate", cert_file), ("key", key_file)):
        if path is not None and not os.access(path, os.R_OK):
            reason = "no such file" if not os.path.exists(path) else "permission denied"
            raise TLSConfigError(f"cannot read TLS {label} {path}: {reason}")
    _check_pem(cert_file, key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper() or "key values mismatch" in reason.lower():
            reason = "the private key does not belong to the certificate"
        raise TLSConfigError(
            f"cannot use TLS certificate {cert_file}"
            f"{' with key ' + key_file if key_file else ''}: {reason}"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"cannot load TLS certificate {cert_file}: {exc.strerror}") from None
    return context


def _check_pem(cert_file: str, key_file: str | None) -> None:
    """Say in plain words what OpenSSL would report as "PEM lib (_ssl.c:NNNN)"."""
    cert_pem = _read("certificate", cert_file)
    key_pem = cert_pem if key_file is None else _read("key", key_file)
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise TLSConfigError(
            f"no PEM certificate in {cert_file} (expected a -----BEGIN CERTIFICATE----- block)"
        )
    if not _PRIVATE_KEY.search(key_pem):
        if key_file is None:
            raise TLSConfigError(f"no private key in {cert_file}: give the key with --tls-key")
        raise TLSConfigError(f"no PEM private key in {key_file}")


def _read(label: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSConfigError(f"cannot read TLS {label} {path}: {exc.strerror}") from None
