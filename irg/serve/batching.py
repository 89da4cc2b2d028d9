"""Batching policy of the call-at-a-time generator (``scheduler: call``; the default, the engine,
needs none of it but :class:`EventRouter`): which requests may share one pipeline call, and how each
one gets back exactly its own outputs and events.

A pipeline call takes a batch of prompts whose denoising passes share every forward, so a replica
serves concurrent requests faster by merging them. That is only sound for requests that agree on
everything but their prompts and seeds (:func:`batch_key`); each prompt keeps its own seed, so its
images do not depend on what it was batched with. No Ray and no FastAPI here: the Serve application
(``serve_apps/irg_app.py``) decides when to merge, this module what and how.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

from irg.pipeline import GenerationRequest, PipelineEvent
from irg.serve.api import event_payload

Stream = TypeVar("Stream")
Job = TypeVar("Job")
log = logging.getLogger(__name__)


def batch_key(request: GenerationRequest) -> Hashable:
    """Equal for requests that may share a pipeline batch: everything the pipeline applies to the whole
    batch (size, steps, rounds, per-round CFG settings, transforms, think budget and temperature,
    system prompt) must agree. Given noise is shaped for its own request, so such a request never
    shares (its key is unique to it)."""
    if any(n is not None for n in [*request.init_noise, *request.vae_encode_noise]):
        return ("own", id(request))
    return (request.height, request.width, request.num_steps, request.rounds, repr(request.round_settings),
            request.vae_transform, request.vit_transform, request.think_temperature, request.max_think_tokens,
            request.system_prompt)


def group_by_batch_key(requests: Sequence[GenerationRequest]) -> list[list[int]]:
    """The positions of ``requests`` grouped by :func:`batch_key`, in order of first appearance: each
    group can run as one pipeline call."""
    groups: dict[Hashable, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(batch_key(request), []).append(i)
    return list(groups.values())


def merge_requests(requests: Sequence[GenerationRequest]) -> GenerationRequest:
    """One request holding every prompt of ``requests`` (which share a :func:`batch_key`), in order,
    each with its own seed, think texts and images. A lone request is returned as it is."""
    if len(requests) == 1:
        return requests[0]
    return dataclasses.replace(
        requests[0], single=False,
        prompts=[p for r in requests for p in r.prompts], seeds=[s for r in requests for s in r.seeds],
        think_texts=[t for r in requests for t in r.think_texts], images=[i for r in requests for i in r.images])


def split_outputs(requests: Sequence[GenerationRequest], outputs: Sequence) -> list[list]:
    """The outputs of ``merge_requests(requests)`` cut back into one list per request, in order."""
    if len(outputs) != sum(r.batch_size for r in requests):
        raise ValueError(f"{len(outputs)} outputs for {sum(r.batch_size for r in requests)} merged prompts")
    parts, start = [], 0
    for request in requests:
        parts.append(list(outputs[start: start + request.batch_size]))
        start += request.batch_size
    return parts


async def run_isolated(jobs: Sequence[Job], run: Callable[[list[Job]], Awaitable[list]],
                       before_retry: Callable[[Job, Exception], None] | None = None) -> list:
    """``run(jobs)``'s results, one per job, such that one failing job never fails the others: if the
    batch fails, each job runs again alone (``before_retry(job, error)`` first, e.g. to tell a stream
    that it starts over) and only a job that fails alone gets its exception, as its result. A batch
    fails as a whole when one of its prompts breaks the shared forward (a poisoned input, memory
    that a smaller batch has), so alone is where the culprit shows itself."""
    try:
        return list(await run(list(jobs)))
    except Exception as error:
        if len(jobs) == 1:
            return [error]
        log.warning("a batch of %d requests failed (%s: %s); each runs again alone", len(jobs),
                    type(error).__name__, error)
        results = []
        for job in jobs:
            if before_retry is not None:
                before_retry(job, error)
            results += await run_isolated([job], run)
        return results


class EventRouter(Generic[Stream]):
    """Sends the events of one merged pipeline call to the streams whose requests it merged.

    The pipeline numbers prompts across the whole merged batch; a client only knows its own prompts,
    so an event about one prompt goes to the stream that owns it, its ``index`` renumbered from 0
    within that stream. Events about the whole batch (steps, done) go to every stream.

    A think token becomes a ``think_delta`` event: the text to put at ``offset`` of the round's text so
    far (its end, unless decoding one more token changed an earlier character, as an unfinished
    multi-byte character does), so a client shows the think as it is sampled in O(tokens) bytes.
    """

    def __init__(self, streams: Sequence[Stream], requests: Sequence[GenerationRequest]):
        self.streams = list(streams)
        self._owners = [(stream, local) for stream, request in zip(streams, requests, strict=True)
                        for local in range(request.batch_size)]
        self._think_so_far: dict[tuple[int, int], str] = {}  # (prompt, round): the text sent so far

    def route(self, event: PipelineEvent) -> list[tuple[Stream, tuple[str, dict]]]:
        """(stream, (event name, data)) for each stream that gets ``event``; none for the events the
        API does not stream."""
        payload = self._think_delta(event) if event.kind == "think_token" else event_payload(event)
        if payload is None:
            return []
        if event.prompt_index < 0:
            return [(stream, payload) for stream in self.streams]
        name, data = payload
        stream, local = self._owners[event.prompt_index]
        return [(stream, (name, {**data, "index": local}))]

    def _think_delta(self, event: PipelineEvent) -> tuple[str, dict] | None:
        key = (event.prompt_index, event.round)
        before, now = self._think_so_far.get(key, ""), event.text or ""
        offset = len(os.path.commonprefix([before, now]))
        if offset == len(before) == len(now):
            return None
        self._think_so_far[key] = now
        return "think_delta", {"index": event.prompt_index, "round": event.round + 1, "offset": offset,
                               "delta": now[offset:]}
