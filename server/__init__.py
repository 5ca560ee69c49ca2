"""mailstorm's SMTP sink: the trio shell around the sans-IO core in ``mailstorm.wire``.

Layout: ``config`` (settings), ``app`` (listeners, sessions' nursery, shutdown), ``session``
(the per-connection driver), ``stores`` and ``trace`` (what a 250 promises), ``credentials``
(AUTH), ``tls``, ``stats``, ``cli``.
"""

from .app import ConfigError, SinkServer
from .config import Address, SinkConfig

__all__ = ["Address", "ConfigError", "SinkConfig", "SinkServer"]
