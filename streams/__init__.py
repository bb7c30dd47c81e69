"""Faust wiring of driftwarden: settings, topics, tables, agents, metrics, CLI.

Imports go ``streams -> models``, never back.
"""

__all__ = ["agents", "app", "cli", "metrics", "settings", "tables", "topics"]
