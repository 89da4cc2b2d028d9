"""A generation engine run continuously for an asyncio server (continuous batching).

The engine (:class:`irg.pipeline.engine.GenerationEngine`) iterates in a thread of its own while it
has work and sleeps when it has none. A request joins at the next iteration; a request whose caller
goes away (the awaiting task is cancelled: a timeout, a disconnect, a closed stream) is cancelled and
leaves at the next iteration, freeing its KV slots; a stream gets its own request's events as they
happen, whatever else the engine runs. No Ray here: the Serve replica (``serve_apps/irg_app.py``)
only wires this to its endpoints and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from irg.pipeline import GenerationRequest, PipelineEvent
from irg.pipeline.engine import Generation, GenerationCancelled, GenerationEngine, IRGOutput

log = logging.getLogger(__name__)
_END = object()


class EngineLoop:
    """``engine`` iterated in a daemon thread. ``on_iteration(prompts, waiting)`` is called after each
    iteration with the prompts it advanced and the requests still waiting (for metrics)."""

    def __init__(self, engine: GenerationEngine, on_iteration: Callable[[int, int], None] | None = None):
        self.engine = engine
        self.on_iteration = on_iteration
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "largest_batch": 0}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="irg-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop after its current iteration, and the engine's image thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.close()

    def submit(self, request: GenerationRequest, callback: Callable[[PipelineEvent], None] | None = None
               ) -> Generation:
        """Queue ``request`` for the next iteration (a ValueError if it could never fit the engine)."""
        generation = self.engine.submit(request, callback)
        generation.add_done_callback(self._count)
        self._wake.set()
        return generation

    async def generate(self, request: GenerationRequest, callback: Callable[[PipelineEvent], None] | None = None
                       ) -> list[IRGOutput]:
        """The request's outputs; cancelling the awaiting task cancels the generation."""
        generation = self.submit(request, callback)
        try:
            await _done(generation)
        except asyncio.CancelledError:
            generation.cancel()
            raise
        return generation.result()

    async def stream(self, request: GenerationRequest, route: Callable[[PipelineEvent], list]) -> AsyncIterator:
        """Yields ``route(event)``'s items for each of the request's events as the engine makes them, then
        ends (or raises the error the request failed with). Closing the iterator cancels the generation."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def on_event(event: PipelineEvent) -> None:
            for item in route(event):
                loop.call_soon_threadsafe(items.put_nowait, item)

        generation = self.submit(request, on_event)
        generation.add_done_callback(lambda g: loop.call_soon_threadsafe(items.put_nowait, _END))
        try:
            while (item := await items.get()) is not _END:
                yield item
            generation.result()  # raises what the request failed with
        finally:
            generation.cancel()  # nothing if it is done; else it leaves at the next iteration

    def stats(self) -> dict:
        """Requests completed, cancelled and failed, and the most prompts one iteration advanced."""
        return dict(self.counts)

    # ------------------------------------------------------------------ the engine's thread

    def _run(self) -> None:
        while not self._stopping:
            iterations = self.engine.iterations
            try:
                busy = self.engine.step()
            except Exception:  # the engine isolates requests; this only keeps the loop alive
                log.exception("an engine iteration failed")
                time.sleep(0.1)
                continue
            if self.engine.iterations > iterations:  # not a wait for image work
                self.counts["largest_batch"] = max(self.counts["largest_batch"], self.engine.last_batch)
                if self.on_iteration is not None:
                    self.on_iteration(self.engine.last_batch, self.engine.waiting)
            if not busy and self.engine.idle:
                self._wake.wait()
                self._wake.clear()

    def _count(self, generation: Generation) -> None:
        if generation.error is None:
            self.counts["completed"] += 1
        elif isinstance(generation.error, GenerationCancelled):
            self.counts["cancelled"] += 1
        else:
            self.counts["failed"] += 1


async def _done(generation: Generation) -> None:
    """Waits (without a thread) until the engine's thread finishes ``generation``."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def wake(_):
        loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

    generation.add_done_callback(wake)
    await finished
