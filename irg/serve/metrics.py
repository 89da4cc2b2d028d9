"""The generator service's own metrics, on Ray's Prometheus endpoint next to Serve's built-in ones.

Prometheus names (Ray prefixes ``ray_``; every series also carries Serve's ``deployment``,
``replica`` and ``application`` tags):

==========================================  ==========  =====================================================
``ray_irg_requests_total``                  counter     HTTP responses of the ingress, by ``route`` and ``status``
``ray_irg_queue_depth``                     gauge       requests in a generator replica not yet generating
``ray_irg_batch_size``                      histogram   prompts per engine iteration (or pipeline call)
``ray_irg_think_tokens_total``              counter     think and reflection tokens sampled
``ray_irg_think_tokens_per_second``         histogram   tokens per second of each think phase (all prompts)
``ray_irg_denoise_step_seconds``            histogram   seconds per denoising step of a pipeline call
``ray_irg_time_to_first_image_seconds``     histogram   from a request's arrival at the replica to its
                                                        first decoded image
==========================================  ==========  =====================================================

:class:`GenerationMeter` turns one pipeline call's events into these measurements (no Ray, so it is
tested with a clock of its own); :class:`GeneratorMetrics` and :class:`IngressMetrics` are the Ray
metric objects, made inside a replica (Serve adds its tags there). ``infra/grafana/irg-serve.json``
is the dashboard that reads them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from ray.serve import metrics

from irg.pipeline import PipelineEvent

BATCH_SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
TOKENS_PER_S = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
STEP_S = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10]
FIRST_IMAGE_S = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600]


class GenerationMeter:
    """Measures one pipeline call from its events (:class:`PipelineEvent`), for ``record(name, value)``:

    - ``think_tokens`` and ``think_tokens_per_s`` once per think phase, from its start (the call's
      start or the previous round's last image) to its end (the first ``think_done``), counting
      every prompt's tokens, since they are decoded together;
    - ``denoise_step_s`` for each denoising step of a prompt after its round's first (the first also
      holds the think's prefill);
    - ``time_to_first_image_s`` once per request, from ``arrivals[i]`` (the request's arrival, on
      ``clock``) to the first image of any of its ``sizes[i]`` prompts.
    """

    def __init__(self, arrivals: Sequence[float], sizes: Sequence[int], record: Callable[[str, float], None],
                 clock: Callable[[], float] = time.monotonic):
        self.record, self.clock, self.arrivals = record, clock, list(arrivals)
        self.owner = [i for i, size in enumerate(sizes) for _ in range(size)]  # prompt -> request
        self.imaged: set[int] = set()
        self.phase_start = clock()
        self.think_tokens = 0
        self.thinking = True
        self.last_step: dict[int, float] = {}  # per prompt: the engine steps prompts side by side

    def observe(self, event: PipelineEvent) -> None:
        now = self.clock()
        if event.kind == "think_token":
            self.think_tokens += 1
        elif event.kind == "think_done" and self.thinking:
            self.thinking = False
            if self.think_tokens:
                self.record("think_tokens", self.think_tokens)
                self.record("think_tokens_per_s", self.think_tokens / max(now - self.phase_start, 1e-9))
            self.think_tokens, self.last_step = 0, {}
        elif event.kind == "step":
            if event.prompt_index in self.last_step:
                self.record("denoise_step_s", now - self.last_step[event.prompt_index])
            self.last_step[event.prompt_index] = now
        elif event.kind == "image":
            self.thinking, self.phase_start = True, now  # the next round's think starts after the images
            request = self.owner[event.prompt_index]
            if request not in self.imaged:
                self.imaged.add(request)
                self.record("time_to_first_image_s", now - self.arrivals[request])


class GeneratorMetrics:
    """A generator replica's metrics (made in the replica, so Serve tags them with it)."""

    def __init__(self):
        self.queue_depth = metrics.Gauge("irg_queue_depth", "Requests in the replica not yet generating")
        self.batch_size = metrics.Histogram("irg_batch_size", "Prompts per engine iteration (or pipeline call)",
                                            BATCH_SIZES)
        self.think_tokens = metrics.Counter("irg_think_tokens", "Think and reflection tokens sampled")
        self.think_speed = metrics.Histogram("irg_think_tokens_per_second",
                                             "Think tokens per second of a think phase (all prompts)", TOKENS_PER_S)
        self.step_seconds = metrics.Histogram("irg_denoise_step_seconds", "Seconds per denoising step", STEP_S)
        self.first_image = metrics.Histogram("irg_time_to_first_image_seconds",
                                             "Seconds from a request's arrival to its first image", FIRST_IMAGE_S)
        self._waiting = 0
        self._lock = threading.Lock()  # arrivals on the event loop, starts in the pipeline's thread
        self.queue_depth.set(0)

    def waiting(self, change: int) -> None:
        """``change`` requests more (or fewer) wait for a pipeline call."""
        with self._lock:
            self._waiting += change
            self.queue_depth.set(self._waiting)

    def queue(self, depth: int) -> None:
        """``depth`` requests wait to start (the engine's count after an iteration)."""
        with self._lock:
            self._waiting = depth
            self.queue_depth.set(depth)

    def batch(self, prompts: int) -> None:
        """One engine iteration (or pipeline call) advanced ``prompts`` prompts."""
        self.batch_size.observe(prompts)

    def meter(self, arrivals: Sequence[float], sizes: Sequence[int]) -> GenerationMeter:
        """The meter of requests that arrived at ``arrivals`` (``time.monotonic``) and generate together
        (one request in the engine; a pipeline call's requests otherwise)."""
        return GenerationMeter(arrivals, sizes, self._record)

    def _record(self, name: str, value: float) -> None:
        if name == "think_tokens":
            self.think_tokens.inc(value)
        elif name == "think_tokens_per_s":
            self.think_speed.observe(value)
        elif name == "denoise_step_s":
            self.step_seconds.observe(value)
        elif name == "time_to_first_image_s":
            self.first_image.observe(value)


class IngressMetrics:
    """The ingress's count of responses by route and status (made in the ingress replica)."""

    def __init__(self):
        self.requests = metrics.Counter("irg_requests", "HTTP responses of the IRG ingress",
                                        tag_keys=("route", "status"))

    def response(self, route: str, status: int | str) -> None:
        self.requests.inc(1, {"route": route, "status": str(status)})
