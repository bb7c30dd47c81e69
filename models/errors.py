"""The one exception root of driftwarden.

::

    DriftwardenError
     ├── ConfigError       a setting, environment variable or policy entry is wrong
     ├── InvalidEvent      an input event cannot be used; carries a machine-readable reason
     └── StateError        stored state cannot be read back (corrupt or foreign changelog)

Every message names the field, variable or topic that is wrong.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DriftwardenError", "InvalidEvent", "StateError"]


class DriftwardenError(Exception):
    """Root of every error driftwarden raises on purpose."""


class ConfigError(DriftwardenError, ValueError):
    """A configuration value is missing or wrong."""


class InvalidEvent(DriftwardenError, ValueError):
    """An event that cannot be used.

    Parameters
    ----------
    reason
        Short machine-readable code; becomes the ``dw.reason`` dead-letter header and the
        ``reason`` label of ``driftwarden_dead_letters_total``.
    message
        Human-readable detail naming the offending field.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class StateError(DriftwardenError):
    """Stored state cannot be decoded."""
