"""Pure monitoring logic: no Kafka, no asyncio, no Prometheus.

Each module holds one concept with river-style ``update()`` objects.
"""

__all__ = [
    "codec",
    "columns",
    "errors",
    "estimate",
    "events",
    "join",
    "monitor",
    "performance",
    "policy",
    "simulation",
]
