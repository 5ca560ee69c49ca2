"""mailstorm's SMTP sink: the trio shell around the sans-IO core in ``mailstorm.wire``.

Layout: ``config`` (settings), ``app`` (listeners, sessions' nursery, shutdown), ``session``
(the per-connection driver), ``stores`` and ``trace`` (what a 250 promises), ``credentials``
(AUTH), ``tls``, ``stats``, ``cli``; ``embed`` (``open_sink``, ``SinkThread``: the sink inside
a program or a test) and ``records`` (what it received, as ``MessageRecord``s).
"""

from .app import ConfigError, SinkServer
from .config import Address, SinkConfig
from .embed import NoRecords, Sink, SinkError, SinkThread, open_sink
from .records import MemoryStore, MessageRecord, SinkTimeout, read_maildir

__all__ = [
    "Address",
    "ConfigError",
    "MemoryStore",
    "MessageRecord",
    "NoRecords",
    "Sink",
    "SinkConfig",
    "SinkError",
    "SinkServer",
    "SinkThread",
    "SinkTimeout",
    "open_sink",
    "read_maildir",
]
