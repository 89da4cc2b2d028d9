"""The IRG generator on Ray Serve: a FastAPI ingress in front of an autoscaled generator deployment.

    serve run serve_apps.irg_app:app model=models:/irg-tiny@champion
    serve run serve_apps/config.yaml

Endpoints: ``POST /v1/images/generations`` (JSON: think texts and base64 PNGs of every round),
``POST /v1/images/generations/stream`` (server-sent events as they happen: think, step, image,
done), ``GET /healthz``, ``GET /v1/models``. Bodies are checked before any model work and a bad one
gets a 4xx naming the field. Concurrent requests of the same shape (JSON ones together, streams
together) are batched into one pipeline call (their denoising passes share each forward); a replica
runs one pipeline call at a time, holds up to ``max_ongoing_requests``, Serve queues
``max_queued_requests`` more and answers 503 beyond that. A client that disconnects stops its
generation at the next step.
"""

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from irg.pipeline import InvalidRequestError
from irg.serve.api import GenerationBody, png_base64, response_body, sse

api = FastAPI(title="IRG", version="1")
RETRY_AFTER_S = 5
MAX_BATCH = 4  # requests in one pipeline call (a replica's max_ongoing_requests should allow as many)
BATCH_WAIT_S = 0.1  # how long the first request of a batch waits for company
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
    max_ongoing_requests=4,  # up to a full batch; generations themselves run one at a time
    max_queued_requests=8,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                        "upscale_delay_s": 2, "downscale_delay_s": 30},
)
class Generator:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto"):
        import torch

        from irg.pipeline import IRGPipeline, resolve_device
        from irg.registry import checkpoint_path

        self.model_name = model
        device = resolve_device(device)
        torch_dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if dtype == "auto" \
            else getattr(torch, dtype)
        self.pipe = IRGPipeline.from_pretrained(checkpoint_path(model), device=device, dtype=torch_dtype)
        self.lock = threading.Lock()  # the pipeline runs one generation at a time
        self.counts = {"completed": 0, "cancelled": 0, "largest_batch": 0}
        self.waiting_streams: dict[tuple, list] = {}

    def info(self) -> dict:
        return {"id": self.model_name, "object": "model", "owned_by": "irg",
                "pixels_per_latent_token": self.pipe.config.pixels_per_latent_token}

    def check(self, body: dict) -> None:
        """Raise ValueError naming the field if ``body`` cannot be generated (no model work)."""
        self._request(body)

    async def generate(self, body: dict) -> dict:
        request = self._request(body)  # a bad body fails here, alone, before it joins a batch
        outputs = await self._generate_batched(request)
        return response_body(self.model_name, outputs, int(time.time()))

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _generate_batched(self, requests: list) -> list:
        """Requests of the same shape (size, steps, rounds, think budget) run as one pipeline batch:
        their denoising passes share each forward. Each prompt keeps its own seed, so its images do
        not depend on what it was batched with."""
        groups: dict = {}
        for i, request in enumerate(requests):
            groups.setdefault(_shape(request), []).append(i)
        results: list = [None] * len(requests)
        for members in groups.values():
            merged = _merge([requests[i] for i in members])
            outputs = await asyncio.to_thread(self._run, merged, None)
            self.counts["largest_batch"] = max(self.counts["largest_batch"], len(members))
            start = 0
            for i in members:
                results[i] = outputs[start: start + requests[i].batch_size]
                start += requests[i].batch_size
        return results

    async def stream(self, body: dict):
        """Yields (event, data) pairs as the generation makes them. Streams of the same shape that
        arrive within ``BATCH_WAIT_S`` share one pipeline batch; each gets only its own prompts'
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
        shape = _shape(job.request)
        waiting = self.waiting_streams.setdefault(shape, [])
        waiting.append(job)
        if len(waiting) == 1:  # the first of its shape: the batch leaves after a short wait
            asyncio.get_running_loop().call_later(BATCH_WAIT_S, self._launch_streams, shape)

    def _launch_streams(self, shape) -> None:
        waiting = self.waiting_streams.pop(shape, [])
        for i in range(0, len(waiting), MAX_BATCH):
            jobs = [job for job in waiting[i: i + MAX_BATCH] if not job.cancelled.is_set()]
            if jobs:
                asyncio.ensure_future(self._run_streams(jobs))

    async def _run_streams(self, jobs: list["_StreamJob"]) -> None:
        owners = [(job, local) for job in jobs for local in range(job.request.batch_size)]

        def deliver(job, item):
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)

        def callback(event):
            if all(job.cancelled.is_set() for job in jobs):
                raise GenerationCancelled()
            converted = _event(event)
            if converted is None:
                return
            name, data = converted
            if event.prompt_index < 0:  # about the whole batch (steps, done): every stream gets it
                for job in jobs:
                    deliver(job, (name, data))
                return
            job, local = owners[event.prompt_index]
            deliver(job, (name, {**data, "index": local}))

        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(jobs))
        try:
            await asyncio.to_thread(self._run, _merge([job.request for job in jobs]), callback)
        except Exception as e:  # every stream of the batch hears about it
            for job in jobs:
                deliver(job, e)
        for job in jobs:
            deliver(job, _END)

    def _request(self, body: dict):
        try:
            return GenerationBody(**body).to_request(self.pipe.config, default_seed=int(time.time()))
        except InvalidRequestError as e:
            raise ValueError(str(e)) from None

    def stats(self) -> dict:
        return dict(self.counts)

    def _run(self, request, callback):
        with self.lock:
            try:
                outputs = self.pipe.generate(request, callback)
            except GenerationCancelled:
                self.counts["cancelled"] += 1
                return None
            self.counts["completed"] += 1
            return outputs


def _shape(request) -> tuple:
    """What must agree for requests to share a pipeline batch (given noise makes a request its own)."""
    if any(n is not None for n in [*request.init_noise, *request.vae_encode_noise]):
        return ("own", id(request))
    return (request.height, request.width, request.num_steps, request.rounds, repr(request.round_settings),
            request.vae_transform, request.vit_transform, request.think_temperature, request.max_think_tokens,
            request.system_prompt)


def _merge(requests: list):
    if len(requests) == 1:
        return requests[0]
    return dataclasses.replace(
        requests[0], single=False,
        prompts=[p for r in requests for p in r.prompts], seeds=[s for r in requests for s in r.seeds],
        think_texts=[t for r in requests for t in r.think_texts], images=[i for r in requests for i in r.images])


def _event(event) -> "tuple[str, dict] | None":
    if event.kind == "think_done":
        return "think", {"index": event.prompt_index, "round": event.round + 1, "text": event.text}
    if event.kind == "step":
        return "step", {"index": event.prompt_index, "round": event.round + 1, "step": event.step,
                        "num_steps": event.num_steps}
    if event.kind == "image":
        return "image", {"index": event.prompt_index, "round": event.round + 1, "b64_png": png_base64(event.image)}
    if event.kind == "done":
        return "done", {}
    return None


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, request_timeout_s: float = 600.0):
        self.generator = generator
        self.request_timeout_s = request_timeout_s

    @api.get("/", response_class=HTMLResponse)
    async def playground(self) -> str:
        """The playground: a prompt box and settings; each round's think text and image as they stream in."""
        return PLAYGROUND.read_text()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [await self.generator.info.remote()]}

    @api.post("/v1/images/generations")
    async def generations(self, body: GenerationBody) -> dict:
        response = self.generator.generate.remote(body.model_dump())
        try:
            return await asyncio.wait_for(response, self.request_timeout_s)
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        except BackPressureError:
            raise _busy() from None
        except TimeoutError:
            response.cancel()
            raise HTTPException(status_code=504, detail=f"generation took over {self.request_timeout_s} s") from None

    @api.post("/v1/images/generations/stream")
    async def generations_stream(self, body: GenerationBody, request: Request) -> StreamingResponse:
        try:  # a bad request gets its 4xx before the stream (and its 200) starts
            await self.generator.check.remote(body.model_dump())
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        except BackPressureError:
            raise _busy() from None
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

        return StreamingResponse(events(), media_type="text/event-stream")


def build_app(args: dict):
    """``serve run serve_apps.irg_app:app model=...``: the application for a model path, URI or registry alias."""
    if "model" not in args:
        raise ValueError("give the model: serve run serve_apps.irg_app:app model=models:/NAME@champion (or a path)")
    generator = Generator.bind(args["model"], args.get("device", "auto"), args.get("dtype", "auto"))
    return Ingress.bind(generator, float(args.get("request_timeout_s", 600)))


app = build_app
