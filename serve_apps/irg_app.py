"""The IRG generator on Ray Serve: a FastAPI ingress in front of an autoscaled generator deployment.

    serve run serve_apps.irg_app:app model=models:/irg-tiny@champion device=cpu
    serve run serve_apps/config.yaml

Endpoints: ``POST /v1/images/generations`` (OpenAI's Images API, :mod:`irg.serve.openai_api`: the final
image as ``b64_json`` or ``url``, its ``revised_prompt``, and the think texts and PNGs of every round;
``stream: true`` gives OpenAI's image streaming events),
``POST /v1/images/generations/stream`` (server-sent events as they happen: think, step, image,
done), ``GET /healthz``, ``GET /v1/models``, ``GET /v1/limits`` (each body field's default and
bounds). Bodies are checked before any model work and a bad one gets a 4xx naming the field. The
builder's args are :class:`irg.serve.options.AppArgs` (Serve validates them before building).
Concurrent requests of the same shape (JSON ones together, streams together) are batched into one
pipeline call, by the policy of :mod:`irg.serve.batching`; the ``Generator``'s ``user_config``
(:class:`irg.serve.options.BatchOptions`) sets how many and how long to wait, changeable without a
restart. A replica runs one pipeline call at a time, holds up to ``max_ongoing_requests``, Serve
queues ``max_queued_requests`` more and answers 503 beyond that. A client that disconnects stops its
generation at the next step, a JSON request that times out or whose client disconnects too (once
every request of its batch is gone). ``/v1/*`` asks for an API key (``Authorization: Bearer``,
:mod:`irg.serve.auth`) when the app requires one, and refuses a request over its compute budget or
a key's concurrency (:mod:`irg.serve.budget`) before any model work.

This module is only the Ray and FastAPI wiring; what it wires lives in :mod:`irg.serve`.
"""

import asyncio
import dataclasses
import threading
import time
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
from irg.serve.batching import EventRouter, batch_key, group_by_batch_key, merge_requests, split_outputs
from irg.serve.budget import Budget, ConcurrencyLimiter
from irg.serve.openai_api import ImageStore, OpenAIError, OpenAIStream, generation_error, openai_response, parse_body
from irg.serve.options import AppArgs, BatchOptions

api = FastAPI(title="IRG", version="1")


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, error: OpenAIError) -> JSONResponse:
    """Any endpoint's OpenAIError (a 401, a budget's 400 or 429) in OpenAI's shape, with its headers."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

RETRY_AFTER_S = 5
BATCHING = BatchOptions()  # the Generator's default user_config
_END = object()  # a stream's last item
PLAYGROUND = Path(__file__).with_name("playground.html")


def _busy() -> HTTPException:
    return HTTPException(status_code=503, detail="every generator replica is busy and its queue is full; retry later",
                         headers={"Retry-After": str(RETRY_AFTER_S)})


class GenerationCancelled(Exception):
    """Raised inside the pipeline's callback to stop a generation nobody waits for any more."""


@dataclasses.dataclass
class _StreamJob:
    request: object
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=4,  # >= max_batch_size: up to a full batch; generations themselves run one at a time
    max_queued_requests=8,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                        "upscale_delay_s": 2, "downscale_delay_s": 30},
    user_config=BATCHING.model_dump(),
)
class Generator:
    def __init__(self, model: str, device: str, dtype: str):  # from AppArgs, which holds their defaults
        from irg.pipeline import IRGPipeline
        from irg.registry import checkpoint_path

        self.model_name = model
        self.pipe = IRGPipeline.from_pretrained(checkpoint_path(model), device=device, dtype=dtype)
        self.lock = threading.Lock()  # the pipeline runs one generation at a time
        self.counts = {"completed": 0, "cancelled": 0, "largest_batch": 0}
        self.waiting_streams: dict = {}
        self.batching = BATCHING  # until reconfigure

    def reconfigure(self, user_config: dict | None) -> None:
        """Serve calls this when a replica starts and whenever the deployment's ``user_config``
        changes: batch size and wait apply to the JSON batches and the stream batches alike."""
        self.batching = BatchOptions.model_validate(user_config or {})
        self._generate_batched.set_max_batch_size(self.batching.max_batch_size)
        self._generate_batched.set_batch_wait_timeout_s(self.batching.batch_wait_timeout_s)

    def info(self) -> dict:
        return {"id": self.model_name, "object": "model", "owned_by": "irg",
                "pixels_per_latent_token": self.pipe.config.pixels_per_latent_token}

    def limits(self) -> dict:
        """Each body field's bounds and the loaded model's defaults (``GET /v1/limits``)."""
        return body_limits(self.pipe.defaults)

    def check(self, body: dict) -> int:
        """Raise ValueError naming the field if ``body`` cannot be generated (no model work); else its rounds."""
        return self._request(body).rounds

    async def generate(self, body: dict) -> dict:
        request = self._request(body)  # a bad body fails here, alone, before it joins a batch
        cancelled = threading.Event()
        try:
            outputs = await self._generate_batched((request, cancelled))
        except asyncio.CancelledError:  # Serve cancels the call on a timeout or a disconnect
            cancelled.set()  # its batch stops at the next step once every member is gone
            raise
        return response_body(self.model_name, outputs, int(time.time()))

    @serve.batch(max_batch_size=BATCHING.max_batch_size, batch_wait_timeout_s=BATCHING.batch_wait_timeout_s)
    async def _generate_batched(self, jobs: list) -> list:
        """Each group of requests that may share a batch (:func:`irg.serve.batching.batch_key`) runs
        as one pipeline call; each request gets back its own outputs. ``jobs`` are (request, cancelled)
        pairs: a call stops at its next step once every one of its requests is cancelled."""
        requests = [request for request, _ in jobs]
        results: list = [None] * len(requests)
        for members in group_by_batch_key(requests):
            group = [requests[i] for i in members]
            flags = [jobs[i][1] for i in members]
            if all(flag.is_set() for flag in flags):
                continue

            def callback(event, flags=flags):
                if all(flag.is_set() for flag in flags):
                    raise GenerationCancelled()

            outputs = await asyncio.to_thread(self._run, merge_requests(group), callback)
            self.counts["largest_batch"] = max(self.counts["largest_batch"], len(members))
            if outputs is None:  # cancelled: nobody waits for these
                continue
            for i, own in zip(members, split_outputs(group, outputs)):
                results[i] = own
        return results

    async def stream(self, body: dict):
        """Yields (event, data) pairs as the generation makes them. Streams of the same shape that
        arrive within ``batch_wait_timeout_s`` share one pipeline batch; each gets only its own prompts'
        events. If the consumer goes away, its events are dropped, and the generation stops at the
        next step once no stream of the batch is left."""
        job = _StreamJob(self._request(body), asyncio.Queue(), asyncio.get_running_loop())
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

    def _enqueue_stream(self, job: "_StreamJob") -> None:
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

    async def _run_streams(self, jobs: list["_StreamJob"]) -> None:
        requests = [job.request for job in jobs]
        router = EventRouter(jobs, requests)

        def deliver(job, item):
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)

        def callback(event):
            if all(job.cancelled.is_set() for job in jobs):
                raise GenerationCancelled()
            for job, item in router.route(event):
                deliver(job, item)

        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(jobs))
        try:
            await asyncio.to_thread(self._run, merge_requests(requests), callback)
        except Exception as e:  # every stream of the batch hears about it
            for job in jobs:
                deliver(job, e)
        for job in jobs:
            deliver(job, _END)

    def _request(self, body: dict):
        try:
            return GenerationBody(**body).to_request(self.pipe.config, default_seed=int(time.time()),
                                                     defaults=self.pipe.defaults)
        except InvalidRequestError as e:
            raise ValueError(str(e)) from None

    def stats(self) -> dict:
        """Pipeline calls completed and cancelled, the largest batch so far, and the batching in force."""
        return {**self.counts, **self.batching.model_dump()}

    def _run(self, request, callback):
        with self.lock:
            try:
                outputs = self.pipe.generate(request, callback)
            except GenerationCancelled:
                self.counts["cancelled"] += 1
                return None
            self.counts["completed"] += 1
            return outputs


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, request_timeout_s: float = 600.0, image_store: str | None = None,
                 image_url_expiry_s: int = 3600, require_api_key: bool = False,
                 api_keys_env: str = "IRG_API_KEYS", budget: Budget | None = None,
                 max_concurrent_per_key: int | None = None):
        self.generator = generator
        self.request_timeout_s = request_timeout_s
        self.image_store, self.image_url_expiry_s = image_store, image_url_expiry_s
        self.keys = KeyRing.from_env(require_api_key, api_keys_env)  # from this replica's environment
        self.budget = budget or Budget(None, None)
        # Per key; without keys every caller is the same anonymous one, so no per-key limit then.
        self.concurrency = ConcurrencyLimiter(max_concurrent_per_key if require_api_key else None)
        self.model_id: str | None = None  # the served model's id, asked once
        self.body_limits: dict | None = None  # the served model's defaults and bounds, asked once

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
        self._caller(request)
        return {"object": "list", "data": [await self.generator.info.remote()]}

    @api.post("/v1/images/generations")
    async def generations(self, request: Request):
        """OpenAI's Images API (:mod:`irg.serve.openai_api`): IRG's own fields too, every bad body a 400 in
        OpenAI's shape naming the field; ``stream: true`` answers with OpenAI's image streaming events."""
        held = None
        try:
            caller = self._caller(request)
            if self.model_id is None:
                self.model_id = (await self.generator.info.remote())["id"]
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
                raise OpenAIError(f"generation took over {self.request_timeout_s} s", status=504,
                                  type="server_error") from None
            except asyncio.CancelledError:  # the client went away
                response.cancel()
                raise
            store = await asyncio.to_thread(self._store) if body.response_format == "url" else None
            return await asyncio.to_thread(openai_response, native, body, store)
        except OpenAIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except ValueError as e:  # Ray's error wraps the replica's; the message is the cause's
            return JSONResponse(generation_error(str(getattr(e, "cause", None) or e)).body(), status_code=400)
        except BackPressureError:
            busy = _busy()
            return JSONResponse(OpenAIError(busy.detail, status=503, type="server_error").body(), status_code=503,
                                headers=busy.headers)
        finally:
            if held is not None:
                self.concurrency.release(held)

    def _store(self) -> ImageStore:
        try:
            return ImageStore.default(self.image_store, self.image_url_expiry_s)
        except Exception as e:  # no store configured or a broken config: the url cannot be honoured
            raise OpenAIError(f"response_format: url needs an object store: {e}", param="response_format",
                              code="unsupported_value") from None

    async def _openai_stream(self, body, caller: str) -> StreamingResponse:
        native = body.native()
        try:
            rounds = await self.generator.check.remote(native)  # a bad request fails before the 200
        except BaseException:
            self.concurrency.release(caller)
            raise
        stream = self.generator.options(stream=True).stream.remote(native)
        converter = OpenAIStream(body, rounds, int(time.time()))

        async def events():
            late = self.request_timeout_s
            deadline = asyncio.get_running_loop().time() + late
            try:
                async for name, data in stream:
                    for text in await asyncio.to_thread(converter.event, name, data):
                        yield text
                    if asyncio.get_running_loop().time() > deadline:
                        yield converter.event("error", {"detail": f"generation took over {late} s"})[0]
                        return
            except BackPressureError:
                yield converter.event("error", {"detail": _busy().detail})[0]
            except ValueError as e:
                yield converter.event("error", {"detail": str(e)})[0]
            finally:
                stream.cancel()
                self.concurrency.release(caller)

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/v1/images/generations/stream")
    async def generations_stream(self, body: GenerationBody, request: Request) -> StreamingResponse:
        caller = self._caller(request)
        await self._admit(body, caller)
        try:  # a bad request gets its 4xx before the stream (and its 200) starts
            await self.generator.check.remote(body.model_dump())
        except ValueError as e:
            self.concurrency.release(caller)
            raise HTTPException(status_code=422, detail=str(e)) from None
        except BackPressureError:
            self.concurrency.release(caller)
            raise _busy() from None
        except BaseException:
            self.concurrency.release(caller)
            raise
        stream = self.generator.options(stream=True).stream.remote(body.model_dump())

        async def events():
            deadline = asyncio.get_running_loop().time() + self.request_timeout_s
            try:
                async for name, data in stream:
                    yield sse(name, data)
                    if asyncio.get_running_loop().time() > deadline:
                        yield sse("error", {"detail": f"generation took over {self.request_timeout_s} s"})
                        return
            except BackPressureError:
                yield sse("error", {"detail": _busy().detail, "retry_after_s": RETRY_AFTER_S})
            except ValueError as e:
                yield sse("error", {"detail": str(e)})
            finally:
                stream.cancel()
                self.concurrency.release(caller)

        return StreamingResponse(events(), media_type="text/event-stream")


def build_app(args: AppArgs) -> Application:
    """``serve run serve_apps.irg_app:app model=...``: the application for a model path, URI or registry
    alias. Serve validates the args against :class:`AppArgs` first (the annotation must stay a class,
    not a string), so an unknown or bad one is refused by name before anything starts."""
    return bind_app(args)


def bind_app(args: AppArgs, **generator_options) -> Application:
    """The application for ``args`` with Serve deployment options (``autoscaling_config``,
    ``user_config``, ...) overriding the Generator's: for benchmarks and tests that deploy from Python."""
    generator = Generator.options(**generator_options) if generator_options else Generator
    required = keys_required(args.require_api_key, _http_host())
    KeyRing.from_env(required, args.api_keys_env)  # keys required and none configured: refuse to build
    return Ingress.bind(generator.bind(args.model, args.device, args.dtype), args.request_timeout_s, args.image_store,
                        args.image_url_expiry_s, required, args.api_keys_env, args.budget,
                        args.max_concurrent_per_key)


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
