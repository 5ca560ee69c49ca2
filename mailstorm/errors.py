"""The error both shells raise for settings they cannot use.

One class for the sink (``mailstorm.sink``) and the load generator (``mailstorm.load``), so
that code embedding either, and the command line of both, catch one thing.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A setting that cannot be used; the message is one line for the operator, naming the
    setting and the problem."""
