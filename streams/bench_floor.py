"""The Faust floor: a worker whose agent does nothing with the events it is handed.

``python -m streams.bench_floor EVENTS OUT`` runs a Faust worker built like driftwarden's
(:func:`streams.app.create_app`, same settings, same GC tuning) whose agent takes
``take_events`` batches of the co-partitioned ``predictions`` and ``labels`` topics
through a Faust stream and only counts them.
Once it has seen ``EVENTS`` events it writes to the file ``OUT`` how many events came
after its first batch and the seconds they took, and exits. The bench runs it to show
what Faust's per-event machinery alone costs: no worker that consumes through a Faust
stream can be faster. (driftwarden's join does not: ``streams.app.BatchConsumer``.)
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import cast

import faust

from streams.app import create_app
from streams.cli import keep_gc_off_the_event_path
from streams.settings import Settings
from streams.topics import TopicNames, ensure_topics


def main(argv: list[str]) -> None:
    events, out = int(argv[0]), argv[1]
    settings = Settings.from_env()
    partitions = asyncio.run(ensure_topics(settings))
    app = create_app(settings, partitions)
    names = TopicNames.from_settings(settings)
    seen, first, first_batch = 0, 0.0, 0

    @app.agent(app.topic(names.predictions, names.labels), concurrency=1, name="floor")
    async def floor(stream: faust.StreamT) -> None:
        nonlocal seen, first, first_batch
        batches = cast(faust.Stream, stream).take_events(settings.batch_size,
                                                          within=settings.batch_seconds)
        async for batch in batches:
            if not seen:
                first, first_batch = time.perf_counter(), len(batch)
            seen += len(batch)
            if seen >= events:
                with open(out + ".tmp", "w") as f:
                    f.write(f"{seen - first_batch} {time.perf_counter() - first}\n")
                os.replace(out + ".tmp", out)
                os._exit(0)  # the measurement is written; a clean Faust shutdown adds nothing

    sys.argv = ["driftwarden-floor", "worker", "-l", "warn", *argv[2:]]
    keep_gc_off_the_event_path()  # as the worker does: the floor gets the same GC
    app.main()


if __name__ == "__main__":
    main(sys.argv[1:])
