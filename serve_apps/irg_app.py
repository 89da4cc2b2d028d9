"""The IRG generator on Ray Serve: a FastAPI ingress in front of an autoscaled generator deployment.

    serve run serve_apps.irg_app:app model=models:/irg-tiny@champion device=cpu
    serve run serve_apps/config.yaml

Endpoints: ``POST /v1/images/generations`` (OpenAI's Images API, :mod:`irg.serve.openai_api`: the final
image as ``b64_json`` or ``url``, its ``revised_prompt``, and the think texts and PNGs of every round;
``stream: true`` gives OpenAI's image streaming events),
``POST /v1/images/generations/stream`` (server-sent events as they happen: think_delta, think,
step, image, done), ``GET /healthz``, ``GET /v1/models``, ``GET /v1/limits`` (each body field's default and
bounds). Bodies are checked before any model work and a bad one gets a 4xx naming the field. The
builder's args are :class:`irg.serve.options.AppArgs` (Serve validates them before building).
Each ``Generator`` replica runs a generation engine (:class:`irg.serve.engine_loop.EngineLoop`,
continuous batching): requests join at the next iteration, as many as its KV slots hold (the
``kv_slots`` arg), the rest wait in it; it holds up to ``max_ongoing_requests``, Serve queues
``max_queued_requests`` more and answers 503 beyond that. A client that disconnects, or a JSON request
that times out, leaves at the next iteration. ``scheduler: call`` runs the earlier ``CallGenerator``
instead: one pipeline call at a time, same-shape requests batched by :mod:`irg.serve.batching` as its
``user_config`` (:class:`irg.serve.options.BatchOptions`) says. ``/v1/*`` asks for an API key
(``Authorization: Bearer``, :mod:`irg.serve.auth`) when the app requires one, and refuses a request
over its compute budget or a key's concurrency (:mod:`irg.serve.budget`) before any model work. A
request whose part of a shared forward (or call) fails is the only one to fail; clients read errors
through :mod:`irg.serve.errors` (never Ray's traceback); streams keep alive and end at their
timeout (:mod:`irg.serve.streaming`); every request is measured into :mod:`irg.serve.metrics`.

This module is only the Ray and FastAPI wiring; what it wires lives in :mod:`irg.serve`.
"""

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path

import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from irg.pipeline import InvalidRequestError
from irg.serve.api import GenerationBody, body_limits, response_body, sse
from irg.serve.auth import KeyRing, keys_required
from irg.serve.batching import EventRouter, batch_key, group_by_batch_key, merge_requests, run_isolated, split_outputs
from irg.serve.budget import Budget, ConcurrencyLimiter
from irg.serve.errors import public_error
from irg.serve.metrics import GeneratorMetrics, IngressMetrics
from irg.serve.openai_api import ImageStore, OpenAIError, OpenAIStream, generation_error, openai_response, parse_body
from irg.serve.options import AppArgs, BatchOptions
from irg.serve.streaming import KEEP_ALIVE, StreamTimeout, paced

api = FastAPI(title="IRG", version="1")
log = logging.getLogger("ray.serve")  # into the replica's Serve log


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, error: OpenAIError) -> JSONResponse:
    """Any endpoint's OpenAIError (a 401, a budget's 400 or 429) in OpenAI's shape, with its headers."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    """Whatever else fails: a 500 naming the kind of error and a request id; the details go to the log."""
    return JSONResponse(_server_error(error).body(), status_code=500)


@api.middleware("http")
async def _count_responses(request: Request, call_next):
    """Counts every response by route and status (``irg_requests``; unknown paths as ``other``)."""
    status = 500  # an exception here becomes _unexpected's 500 outside this middleware
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        counter = getattr(request.app.state, "metrics", None)
        if counter is not None:
            counter.response(getattr(request.scope.get("route"), "path", "other"), status)


def _server_error(error: BaseException) -> OpenAIError:
    """A failure that is not the client's, for the client: logged in full under an id it is told."""
    request_id = uuid.uuid4().hex[:12]
    public = public_error(error, request_id)
    if public.client_fault:
        return generation_error(public.message)
    log.error("request %s failed", request_id, exc_info=error)
    return OpenAIError(public.message, status=500, type="server_error")


RETRY_AFTER_S = 5
BATCHING = BatchOptions()  # the call-at-a-time Generator's default user_config
_END = object()  # a stream's last item
PLAYGROUND = Path(__file__).with_name("playground.html")


def _busy() -> HTTPException:
    return HTTPException(status_code=503, detail="every generator replica is busy and its queue is full; retry later",
                         headers={"Retry-After": str(RETRY_AFTER_S)})


class GenerationCancelled(Exception):
    """Raised inside the pipeline's callback to stop a generation nobody waits for any more."""


@dataclasses.dataclass(eq=False)
class _Job:
    """One request in a generator replica; a stream's also has the queue its events go to."""

    request: object
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    events: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    queued: bool = True  # still waiting for a pipeline call (the queue-depth gauge)

    def deliver(self, item) -> None:
        """Hands a stream item to the stream's consumer (from any thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class _Replica:
    """What a generator replica holds whatever its scheduler: the pipeline, the checks of a request
    against the loaded model, its limits, the replica's metrics."""

    def __init__(self, model: str, device: str, dtype: str):  # from AppArgs, which holds their defaults
        from irg.pipeline import IRGPipeline
        from irg.registry import checkpoint_path

        self.model_name = model
        self.pipe = IRGPipeline.from_pretrained(checkpoint_path(model), device=device, dtype=dtype)
        self.metrics = GeneratorMetrics()

    def limits(self) -> dict:
        """Each body field's bounds and the loaded model's defaults (``GET /v1/limits``)."""
        return body_limits(self.pipe.defaults)

    def check(self, body: dict) -> int:
        """Raise ValueError naming the field if ``body`` cannot be generated (no model work); else its rounds."""
        return self._request(body).rounds

    def _request(self, body: dict):
        try:
            return GenerationBody(**body).to_request(self.pipe.config, default_seed=int(time.time()),
                                                     defaults=self.pipe.defaults)
        except InvalidRequestError as e:
            raise ValueError(str(e)) from None


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=8,  # the engine generates as many as its KV slots hold; the others wait in it
    max_queued_requests=8,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                        "upscale_delay_s": 2, "downscale_delay_s": 30},
)
class Generator(_Replica):
    """``scheduler: engine`` (the default): continuous batching. One generation engine per replica
    (:class:`irg.serve.engine_loop.EngineLoop`) advances every request one think token or denoising
    step per iteration, whatever their sizes, steps, rounds and CFG settings; a request joins at the
    next iteration, one whose client goes away leaves at the next and frees its KV slots, and a
    request whose forward fails fails alone."""

    def __init__(self, model: str, device: str, dtype: str, kv_slots: int = 8, kv_slot_tokens: int | None = None):
        from irg.pipeline.engine import GenerationEngine, context_tokens
        from irg.pipeline.engine import kv_slots as make_slots
        from irg.serve.engine_loop import EngineLoop

        super().__init__(model, device, dtype)
        if kv_slot_tokens is None:  # the model's default request, with a prompt of up to 256 tokens
            kv_slot_tokens = context_tokens(self.pipe, self._request({"prompt": "a prompt"}), 256)
        self.loop = EngineLoop(GenerationEngine(self.pipe, make_slots(self.pipe, kv_slots, kv_slot_tokens)),
                               self._iteration)

    def check(self, body: dict) -> int:
        request = self._request(body)
        self.loop.engine.check(request)  # a request that could never fit the KV slots: a 400 naming them
        return request.rounds

    async def generate(self, body: dict) -> dict:
        request = self._request(body)
        meter = self.metrics.meter([time.monotonic()], [request.batch_size])
        outputs = await self.loop.generate(request, meter.observe)  # cancelled: leaves at the next iteration
        return response_body(self.model_name, outputs, int(time.time()))

    async def stream(self, body: dict):
        """Yields (event, data) pairs of this request's events as the engine makes them."""
        request = self._request(body)
        meter = self.metrics.meter([time.monotonic()], [request.batch_size])
        router = EventRouter([None], [request])  # think tokens become think_delta events

        def route(event):
            meter.observe(event)
            return [item for _, item in router.route(event)]

        async for item in self.loop.stream(request, route):
            yield item

    def stats(self) -> dict:
        """Requests completed, cancelled and failed, the most prompts one iteration advanced, and the
        KV slots (all and free)."""
        slots = self.loop.engine.slots
        return {**self.loop.stats(), "kv_slots": slots.num_slots, "free_kv_slots": slots.free,
                "kv_slot_tokens": slots.slot_tokens}

    def _iteration(self, prompts: int, waiting: int) -> None:
        self.metrics.batch(prompts)
        self.metrics.queue(waiting)


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=4,  # >= max_batch_size: up to a full batch; generations themselves run one at a time
    max_queued_requests=8,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                        "upscale_delay_s": 2, "downscale_delay_s": 30},
    user_config=BATCHING.model_dump(),
)
class CallGenerator(_Replica):
    """``scheduler: call``: one pipeline call at a time; concurrent requests of one shape (JSON ones
    together, streams together) are merged into one call by :mod:`irg.serve.batching`, and a request
    that arrives meanwhile waits until the call has finished every round."""

    def __init__(self, model: str, device: str, dtype: str):
        super().__init__(model, device, dtype)
        self.lock = threading.Lock()  # the pipeline runs one generation at a time
        self.queue_lock = threading.Lock()  # guards _Job.queued between the event loop and the pipeline's thread
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "largest_batch": 0}
        self.waiting_streams: dict = {}
        self.batching = BATCHING  # until reconfigure

    def reconfigure(self, user_config: dict | None) -> None:
        """Serve calls this when a replica starts and whenever the deployment's ``user_config``
        changes: batch size and wait apply to the JSON batches and the stream batches alike."""
        self.batching = BatchOptions.model_validate(user_config or {})
        self._generate_batched.set_max_batch_size(self.batching.max_batch_size)
        self._generate_batched.set_batch_wait_timeout_s(self.batching.batch_wait_timeout_s)

    async def generate(self, body: dict) -> dict:
        job = self._job(body)  # a bad body fails here, alone, before it joins a batch
        try:
            outputs = await self._generate_batched(job)
        except asyncio.CancelledError:  # Serve cancels the call on a timeout or a disconnect
            job.cancelled.set()  # its batch stops at the next step once every member is gone
            raise
        finally:
            self._dequeue([job])
        if isinstance(outputs, Exception):  # this request failed alone (its batch's others did not)
            raise outputs
        return response_body(self.model_name, outputs, int(time.time()))

    @serve.batch(max_batch_size=BATCHING.max_batch_size, batch_wait_timeout_s=BATCHING.batch_wait_timeout_s)
    async def _generate_batched(self, jobs: list[_Job]) -> list:
        """Each group of requests that may share a batch (:func:`irg.serve.batching.batch_key`) runs
        as one pipeline call; each request gets back its own outputs, None if cancelled, or the
        exception it failed with alone (:func:`irg.serve.batching.run_isolated`)."""
        results: list = [None] * len(jobs)
        for members in group_by_batch_key([job.request for job in jobs]):
            group = [jobs[i] for i in members]
            outputs = await run_isolated(group, lambda some: asyncio.to_thread(self._run, some))
            for i, own in zip(members, outputs):
                results[i] = own
        return results

    async def stream(self, body: dict):
        """Yields (event, data) pairs as the generation makes them. Streams of the same shape that
        arrive within ``batch_wait_timeout_s`` share one pipeline batch; each gets only its own prompts'
        events. If the consumer goes away, its events are dropped, and the generation stops at the
        next step once no stream of the batch is left. If the shared batch fails, each stream hears
        ``restart`` and starts over alone."""
        job = self._job(body, stream=True)
        self._enqueue_stream(job)
        try:
            while True:
                item = await job.events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()
            self._dequeue([job])

    def _job(self, body: dict, stream: bool = False) -> _Job:
        job = _Job(self._request(body))
        if stream:
            job.events, job.loop = asyncio.Queue(), asyncio.get_running_loop()
        self.metrics.waiting(+1)
        return job

    def _dequeue(self, jobs: list[_Job]) -> None:
        """``jobs`` no longer wait for a pipeline call (started, finished or gone); each counted once."""
        with self.queue_lock:
            leaving = [job for job in jobs if job.queued]
            for job in leaving:
                job.queued = False
        if leaving:
            self.metrics.waiting(-len(leaving))

    def _enqueue_stream(self, job: _Job) -> None:
        key = batch_key(job.request)
        waiting = self.waiting_streams.setdefault(key, [])
        waiting.append(job)
        if len(waiting) == 1:  # the first of its shape: the batch leaves after a short wait
            asyncio.get_running_loop().call_later(self.batching.batch_wait_timeout_s, self._launch_streams, key)

    def _launch_streams(self, key) -> None:
        waiting = self.waiting_streams.pop(key, [])
        size = self.batching.max_batch_size
        for i in range(0, len(waiting), size):
            jobs = [job for job in waiting[i: i + size] if not job.cancelled.is_set()]
            if jobs:
                asyncio.ensure_future(self._run_streams(jobs))

    async def _run_streams(self, jobs: list[_Job]) -> None:
        def run(some: list[_Job]):
            router = EventRouter(some, [job.request for job in some])

            def on_event(event):
                for job, item in router.route(event):
                    job.deliver(item)

            return asyncio.to_thread(self._run, some, on_event)

        def restart(job: _Job, error: Exception) -> None:
            job.deliver(("restart", {"detail": "the batch this request shared failed; it starts again alone"}))

        for job, result in zip(jobs, await run_isolated(jobs, run, restart)):
            if isinstance(result, Exception):
                job.deliver(result)
            job.deliver(_END)

    def stats(self) -> dict:
        """Pipeline calls completed, cancelled and failed, the largest batch so far, and the batching in force."""
        return {**self.counts, **self.batching.model_dump()}

    def _run(self, jobs: list[_Job], on_event=None) -> list:
        """One pipeline call for ``jobs`` (which share a batch key), in the pipeline's thread: each job's
        outputs, or None for each if every job was cancelled before it ended. Measured for the metrics;
        raises what the pipeline raised."""
        live = [job for job in jobs if not job.cancelled.is_set()]
        if not live:
            return [None] * len(jobs)
        with self.lock:
            self._dequeue(jobs)
            requests = [job.request for job in jobs]
            meter = self.metrics.meter([job.arrived for job in jobs], [r.batch_size for r in requests])
            self.metrics.batch(sum(r.batch_size for r in requests))

            def callback(event):
                if all(job.cancelled.is_set() for job in jobs):
                    raise GenerationCancelled()
                meter.observe(event)
                if on_event is not None:
                    on_event(event)

            self.counts["largest_batch"] = max(self.counts["largest_batch"], len(jobs))
            try:
                outputs = self.pipe.generate(merge_requests(requests), callback)
            except GenerationCancelled:
                self.counts["cancelled"] += 1
                return [None] * len(jobs)
            except Exception:
                self.counts["failed"] += 1
                log.exception("a pipeline call of %d requests failed", len(jobs))
                raise
            self.counts["completed"] += 1
            return split_outputs(requests, outputs)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, model: str, request_timeout_s: float = 600.0,
                 stream_keep_alive_s: float = 15.0, image_store: str | None = None, image_url_expiry_s: int = 3600,
                 require_api_key: bool = False, api_keys_env: str = "IRG_API_KEYS", budget: Budget | None = None,
                 max_concurrent_per_key: int | None = None):
        self.generator = generator
        self.model_id, self.created = model, int(time.time())  # /v1/models, answered here without the generator
        self.request_timeout_s, self.stream_keep_alive_s = request_timeout_s, stream_keep_alive_s
        self.image_store, self.image_url_expiry_s = image_store, image_url_expiry_s
        self.keys = KeyRing.from_env(require_api_key, api_keys_env)  # from this replica's environment
        self.budget = budget or Budget(None, None)
        # Per key; without keys every caller is the same anonymous one, so no per-key limit then.
        self.concurrency = ConcurrencyLimiter(max_concurrent_per_key if require_api_key else None)
        self.body_limits: dict | None = None  # the served model's defaults and bounds, asked once
        api.state.metrics = IngressMetrics()

    def _caller(self, request: Request) -> str:
        """The name of the request's API key (a 401 OpenAIError without a valid one, when keys are required)."""
        return self.keys.check(request.headers.get("authorization"))

    async def _admit(self, body: GenerationBody, caller: str) -> None:
        """Refuses a request over the budget (400) or over its key's concurrency (429); else holds a slot
        of the key's concurrency, which the caller must release."""
        if self.body_limits is None:
            self.body_limits = await self.generator.limits.remote()
        self.budget.check(body, self.body_limits)
        self.concurrency.acquire(caller)

    @api.get("/", response_class=HTMLResponse)
    async def playground(self) -> str:
        """The playground: a prompt box and settings; each round's think text and image as they stream in."""
        return PLAYGROUND.read_text()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/limits")
    async def limits(self, request: Request) -> dict:
        """Each body field's default and bounds (the playground's form takes its own from here), and the
        server's budgets."""
        self._caller(request)
        limits = await self.generator.limits.remote()
        return {**limits, "budget": {"max_request_pixel_steps": self.budget.max_request_pixel_steps,
                                     "max_think_tokens_per_request": self.budget.max_think_tokens_per_request,
                                     "max_concurrent_per_key": self.concurrency.max_concurrent}}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """OpenAI's model list: the served model, from the ingress alone (a generator scaled to zero sleeps on)."""
        self._caller(request)
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "irg"}]}

    @api.post("/v1/images/generations")
    async def generations(self, request: Request):
        """OpenAI's Images API (:mod:`irg.serve.openai_api`): IRG's own fields too, every bad body a 400 in
        OpenAI's shape naming the field; ``stream: true`` answers with OpenAI's image streaming events."""
        held = None
        try:
            caller = self._caller(request)
            body = parse_body(await request.body(), self.model_id)
            await self._admit(body, caller)
            held = caller
            if body.stream:
                held = None  # the stream releases it when it ends
                return await self._openai_stream(body, caller)
            response = self.generator.generate.remote(body.native())
            try:
                native = await asyncio.wait_for(response, self.request_timeout_s)
            except TimeoutError:
                response.cancel()  # the generation stops at its next step
                raise OpenAIError(f"generation took over {self.request_timeout_s:g} s", status=504,
                                  type="server_error") from None
            except asyncio.CancelledError:  # the client went away
                response.cancel()
                raise
            store = await asyncio.to_thread(self._store) if body.response_format == "url" else None
            return await asyncio.to_thread(openai_response, native, body, store)
        except OpenAIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except BackPressureError:
            busy = _busy()
            return JSONResponse(OpenAIError(busy.detail, status=503, type="server_error").body(), status_code=503,
                                headers=busy.headers)
        except Exception as e:  # the generator refused it (400) or failed (500): never Ray's traceback
            error = _server_error(e)
            return JSONResponse(error.body(), status_code=error.status)
        finally:
            if held is not None:
                self.concurrency.release(held)

    def _store(self) -> ImageStore:
        try:
            return ImageStore.default(self.image_store, self.image_url_expiry_s)
        except Exception as e:  # no store configured or a broken config: the url cannot be honoured
            raise OpenAIError(f"response_format: url needs an object store: {e}", param="response_format",
                              code="unsupported_value") from None

    async def _start_stream(self, native: dict, caller: str):
        """The generator's stream for a checked request, and its rounds; a bad request fails before the 200,
        and the caller's concurrency slot is released if it does."""
        try:
            rounds = await self.generator.check.remote(native)
        except BaseException:
            self.concurrency.release(caller)
            raise
        return self.generator.options(stream=True).stream.remote(native), rounds

    async def _relay(self, stream, encode, caller: str):
        """The server-sent text of ``stream``'s events through ``encode(name, data) -> [text]``, with
        keep-alive comments while it is silent and an ``error`` event at the timeout or a failure. The
        generation stops and the caller's slot is released however the stream ends."""
        try:
            async for item in paced(stream, self.stream_keep_alive_s, self.request_timeout_s):
                for text in [KEEP_ALIVE] if item is None else await encode(*item):
                    yield text
        except StreamTimeout as e:
            for text in await encode("error", {"detail": str(e)}):
                yield text
        except BackPressureError:
            for text in await encode("error", {"detail": _busy().detail, "retry_after_s": RETRY_AFTER_S}):
                yield text
        except Exception as e:
            for text in await encode("error", {"detail": _server_error(e).message}):
                yield text
        finally:
            stream.cancel()
            self.concurrency.release(caller)

    async def _openai_stream(self, body, caller: str) -> StreamingResponse:
        native = body.native()
        stream, rounds = await self._start_stream(native, caller)
        converter = OpenAIStream(body, rounds, int(time.time()))

        async def encode(name: str, data: dict) -> list[str]:
            return await asyncio.to_thread(converter.event, name, data)  # images are re-encoded

        return StreamingResponse(self._relay(stream, encode, caller), media_type="text/event-stream")

    @api.post("/v1/images/generations/stream")
    async def generations_stream(self, body: GenerationBody, request: Request) -> StreamingResponse:
        caller = self._caller(request)
        await self._admit(body, caller)
        try:  # a bad request gets its 4xx before the stream (and its 200) starts
            stream, _ = await self._start_stream(body.model_dump(), caller)
        except BackPressureError:
            raise _busy() from None
        except Exception as e:
            error = _server_error(e)
            raise HTTPException(status_code=422 if error.status == 400 else error.status, detail=error.message) \
                from None

        async def encode(name: str, data: dict) -> list[str]:
            return [sse(name, data)]

        return StreamingResponse(self._relay(stream, encode, caller), media_type="text/event-stream")


def build_app(args: AppArgs) -> Application:
    """``serve run serve_apps.irg_app:app model=...``: the application for a model path, URI or registry
    alias. Serve validates the args against :class:`AppArgs` first (the annotation must stay a class,
    not a string), so an unknown or bad one is refused by name before anything starts."""
    return bind_app(args)


def bind_app(args: AppArgs, **generator_options) -> Application:
    """The application for ``args`` with Serve deployment options (``autoscaling_config``,
    ``user_config``, ...) overriding the Generator's: for benchmarks and tests that deploy from Python."""
    if args.scheduler == "engine":
        generator = Generator.options(**generator_options) if generator_options else Generator
        bound = generator.bind(args.model, args.device, args.dtype, args.kv_slots, args.kv_slot_tokens)
    else:  # one deployment name whatever the scheduler: handles, metrics and dashboards find it
        bound = CallGenerator.options(name="Generator", **generator_options).bind(args.model, args.device, args.dtype)
    required = keys_required(args.require_api_key, _http_host())
    KeyRing.from_env(required, args.api_keys_env)  # keys required and none configured: refuse to build
    return Ingress.bind(bound, args.model, args.request_timeout_s,
                        args.stream_keep_alive_s, args.image_store, args.image_url_expiry_s, required,
                        args.api_keys_env, args.budget, args.max_concurrent_per_key)


def _http_host() -> str | None:
    """The host Serve's HTTP proxies bind (``http_options.host``): the running Serve's, else Serve's default
    (``serve.run`` or ``serve run module:app``, which builds before Ray starts, start one with it); None
    (keys then required) if it cannot be told."""
    from ray.serve.config import HTTPOptions

    if not ray.is_initialized():  # asking a controller would start Ray here
        return HTTPOptions().host
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return (client.http_config if client is not None else HTTPOptions()).host
    except Exception:
        return None


app = build_app
