"""The generation engine: many IRG trajectories advanced one iteration at a time, packed into one forward.

A trajectory is one prompt's way through think, draw, reflect, draw again; it is always in one phase:

    PROMPT -> THINK (a token per iteration) -> APPEND_THINK -> DENOISE (a step per iteration)
           -> DECODE -> ENCODE -> FEED_VAE -> FEED_VIT -> THINK (the reflection) -> ... -> done

In each iteration every live trajectory contributes the blocks of its phase (a think token, a
denoising step with its CFG branches, a prompt or think to prefill, an image to feed back) and all of
them run as one packed model forward (:meth:`irg.model.Bagel.forward_blocks`), whatever the
trajectories' sizes, steps, rounds and CFG settings. Requests join at the next iteration and a
cancelled one leaves at the next, so a server runs one engine in one loop (continuous batching), and
:class:`~irg.pipeline.IRGPipeline` runs each call as such a loop. A round's image work (decoding its
latents, encoding the image again for the autoencoder and the ViT: DECODE, ENCODE) runs in a thread
of its own (on CUDA, its own stream) while the others' iterations go on, instead of stalling them.

Per prompt the engine keeps three contexts as KV caches (extending a cache never changes it, so
contexts share prefixes for free):
* ``main``: system prompt, user prompt, each think, each image (clean VAE latents, then ViT tokens);
* ``text_cfg``: the text-unconditional context of the next image: the system prompt alone for round 1,
  then ``main`` as it was before the latest reflection;
* ``text_only``: every text span and no image, the image-unconditional context of rounds 2+.
Each prompt draws its noise and think tokens from its own generator, so its result does not depend on
what it shares iterations with.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image

from irg.model import KVCache
from irg.model.attention import KVSlots
from irg.model.latents import grid_position_ids, patchify_latent
from irg.model.slot_decode import SlotDecoder
from irg.pipeline.events import PipelineEvent
from irg.pipeline.flow import StepResult, combine_cfg, flow_timesteps, guided_branches
from irg.pipeline.request import GenerationRequest, InvalidRequestError
from irg.pipeline.settings import restart_times, runs_model
from irg.pipeline.text import next_tokens
from irg.transforms import ImageTransform, patchify_image

if TYPE_CHECKING:
    from irg.pipeline.irg_pipeline import IRGPipeline

log = logging.getLogger(__name__)


@dataclass
class IRGOutput:
    """The result for one prompt: one think text, image and final packed latent per round."""

    prompt: str
    texts: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    latents: list[torch.Tensor | None] = field(default_factory=list)  # None for a round whose image was given
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Phase(enum.Enum):
    PROMPT = "prompt"  # the user prompt is prefilled after the (shared) system prompt
    THINK = "think"  # one think token per iteration
    APPEND_THINK = "append_think"  # the whole think is prefilled into main (and text_only)
    DENOISE = "denoise"  # one denoising step per iteration
    DECODE = "decode"  # the latents are decoded into the image, off the iteration loop
    ENCODE = "encode"  # the image is encoded (autoencoder, ViT) to be fed back, off the loop
    FEED_VAE = "feed_vae"  # the round's image goes back as clean VAE latents
    FEED_VIT = "feed_vit"  # then as ViT tokens


class GenerationCancelled(Exception):
    """The generation was cancelled before it finished (:meth:`Generation.cancel`)."""


class Generation:
    """A submitted request: its outputs when it is done, or the error it failed with.

    ``cancel()`` may be called from any thread; the engine drops the request at its next iteration.
    """

    def __init__(self, request: GenerationRequest, callback: Callable[[PipelineEvent], None] | None):
        self.request = request
        self.callback = callback
        self.outputs = [IRGOutput(prompt=p, seed=s) for p, s in zip(request.prompts, request.seeds)]
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.iterations = 0  # iterations this request took part in
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._remaining = request.batch_size
        self._on_done: list[Callable[[Generation], None]] = []
        self._on_done_lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def add_done_callback(self, fn: Callable[[Generation], None]) -> None:
        """``fn(self)`` once the generation is done (at once if it is), in the engine's thread: how an
        asyncio server learns of it (``loop.call_soon_threadsafe``)."""
        with self._on_done_lock:
            if not self.done:
                self._on_done.append(fn)
                return
        fn(self)

    def _complete(self, error: BaseException | None = None) -> None:
        with self._on_done_lock:
            self.error = error
            self._done.set()
            callbacks, self._on_done = self._on_done, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - a listener's failure is not the generation's
                log.exception("a generation's done callback failed")

    def result(self) -> list[IRGOutput]:
        """The outputs, one per prompt; raises the error the request failed with."""
        if not self.done:
            raise RuntimeError("the generation has not finished")
        if self.error is not None:
            raise self.error
        return self.outputs

    def emit(self, event: PipelineEvent) -> None:
        if self.callback is not None:
            self.callback(event)


@dataclass(eq=False)
class _Trajectory:
    """One prompt of a request on its way through the phases."""

    generation: Generation
    index: int  # the prompt's position in its request
    generator: torch.Generator
    phase: Phase = Phase.PROMPT
    round: int = 0
    main: KVCache | None = None
    text_cfg: KVCache | None = None
    text_only: KVCache | None = None
    decoding: KVCache | None = None  # main + the think tokens sampled so far (dropped when the think ends)
    think_ids: list[int] = field(default_factory=list)
    think_text: str = ""
    next_token: int = 0
    x: torch.Tensor | None = None  # the latents being denoised [N, 64]
    step: int = 0
    times: torch.Tensor | None = None
    evaluated: list = field(default_factory=list)  # step caching: the last two (t, branches) the model ran
    grid: tuple[int, int] = (0, 0)
    position_ids: torch.Tensor | None = None
    slots: list[int] = field(default_factory=list)  # KV slots held: main's, then text_only's from round 2
    job: Future | None = None  # the image work of DECODE or ENCODE
    latent: torch.Tensor | None = None  # the round's final latents, while they are decoded
    fed: tuple | None = None  # the encoded image: VAE latent tokens, their positions, ViT tokens
    previous_latent: torch.Tensor | None = None  # the last round's latent tokens (a given image: its clean VAE
    # tokens); a round with start_noise starts there
    round_start: float = 0.0
    think_end: float = 0.0

    @property
    def request(self) -> GenerationRequest:
        return self.generation.request

    @property
    def output(self) -> IRGOutput:
        return self.generation.outputs[self.index]


class GenerationEngine:
    """Runs submitted requests (:meth:`submit`) one iteration at a time (:meth:`step`).

    ``slots``: preallocated KV memory (:class:`~irg.model.attention.KVSlots`, see :func:`kv_slots`): each
    prompt holds one slot (two from its second round: the image-free context forks there) while it
    generates, requests wait in order of arrival until their prompts' slots are free, and a request
    that could never fit is refused. None: every context in memory of its own, no bound.
    :meth:`submit` and :meth:`Generation.cancel` may be called from any thread, :meth:`step` from one
    thread at a time.
    """

    def __init__(self, pipe: IRGPipeline, slots: KVSlots | None = None, slot_decode: bool | None = None):
        self.pipe = pipe
        self.model = pipe.model
        self.config = pipe.config
        self.slots = slots
        # Think tokens of contexts in slots decode with static shapes (SlotDecoder), replayed as CUDA
        # graphs on CUDA; None: there only. Other blocks, and contexts outside the slots, run packed.
        if slot_decode is None:
            slot_decode = slots is not None and pipe.device.type == "cuda"
        self.decoder = SlotDecoder(self.model, slots, cuda_graphs=True) if slot_decode and slots else None
        self._images = ThreadPoolExecutor(1, thread_name_prefix="irg-images")
        self._image_stream = torch.cuda.Stream(pipe.device) if pipe.device.type == "cuda" else None
        self._pending: deque[Generation] = deque()
        self._pending_lock = threading.Lock()
        self._live: list[_Trajectory] = []
        self.iterations = 0
        self.last_batch = 0  # prompts the last iteration advanced

    def close(self) -> None:
        """Stop the image thread."""
        self._images.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ requests

    def submit(self, request: GenerationRequest, callback: Callable[[PipelineEvent], None] | None = None
               ) -> Generation:
        """Queue a validated request; it joins at the next iteration that has room for all its prompts.
        A ValueError if it could never fit the engine's KV slots."""
        self.check(request)
        generation = Generation(request, callback)
        with self._pending_lock:
            self._pending.append(generation)
        return generation

    def check(self, request: GenerationRequest) -> None:
        """A ValueError naming the limit if ``request`` could never fit the engine's KV slots."""
        if self.slots is not None:
            needed = request.batch_size * slots_per_prompt(request)
            if needed > self.slots.num_slots:
                raise ValueError(f"n: {request.batch_size} prompts of {request.rounds} rounds need {needed} KV "
                                 f"slots; the engine has {self.slots.num_slots}")
            longest = longest_context(self.pipe, request)
            if longest > self.slots.slot_tokens:
                raise ValueError(f"the request's contexts reach {longest} tokens; the engine's KV slots hold "
                                 f"{self.slots.slot_tokens} (a smaller size, fewer rounds or think tokens fit)")

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet generating."""
        with self._pending_lock:
            return len(self._pending)

    @property
    def idle(self) -> bool:
        return not self._live and not self.waiting

    def run(self, generation: Generation) -> list[IRGOutput]:
        """Iterate until ``generation`` is done (whatever else runs too); its outputs."""
        while not generation.done:
            self.step()
        return generation.result()

    # ------------------------------------------------------------------ one iteration

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration: drop cancelled requests, admit waiting ones, advance every live trajectory that
        is not waiting for its image work by one phase step in one packed forward (or, when all are
        waiting, wait a little for the first). Returns whether there was anything to do."""
        self._drop_cancelled()
        self._admit()
        if not self._live:
            return False
        runnable = self._ready()
        if not runnable:  # every live prompt waits for its image work: wait for the first to finish
            wait([t.job for t in self._live if t.job is not None], timeout=0.05, return_when=FIRST_COMPLETED)
            return True
        self.iterations += 1
        self.last_batch = len(runnable)
        for generation in {t.generation for t in runnable}:
            generation.iterations += 1
        self._advance(runnable)
        return True

    def _ready(self) -> list[_Trajectory]:
        """The live trajectories with something to run: finished image work is taken first (a decoded
        image is the round's; an encoded one goes back into the context)."""
        for t in [t for t in self._live if t.job is not None and t.job.done()]:
            if t.generation.done:  # its request failed earlier in this loop
                continue
            job, t.job = t.job, None
            try:
                result = job.result()
                if t.phase is Phase.DECODE:
                    self._end_image(t, result, t.latent)
                else:
                    t.fed, t.phase = result, Phase.FEED_VAE
                    if t.previous_latent is None:  # a given image: its clean VAE tokens
                        t.previous_latent = result[0]
            except Exception as error:  # noqa: BLE001 - the image work or a callback fails its own request
                self._finish(t.generation, error)
        return [t for t in self._live if t.job is None]

    def _drop_cancelled(self) -> None:
        for generation in {t.generation for t in self._live if t.generation.cancelled}:
            self._finish(generation, GenerationCancelled("cancelled"))
        with self._pending_lock:
            cancelled = [g for g in self._pending if g.cancelled]
            for generation in cancelled:
                self._pending.remove(generation)
        for generation in cancelled:
            self._finish(generation, GenerationCancelled("cancelled"))

    def _admit(self) -> None:
        """Waiting requests join, in order, while their prompts fit."""
        while True:
            with self._pending_lock:
                if not self._pending:
                    return
                generation = self._pending[0]
                request = generation.request
                per_prompt = slots_per_prompt(request)
                if self.slots is not None and self.slots.free < request.batch_size * per_prompt:
                    return
                self._pending.popleft()
            try:
                system = self.pipe.system_cache(request.system_prompt)
            except Exception as error:  # noqa: BLE001 - the request fails, the engine goes on
                self._finish(generation, error)
                continue
            for i, seed in enumerate(request.seeds):
                trajectory = _Trajectory(generation, i, torch.Generator().manual_seed(seed), main=system,
                                         round_start=time.perf_counter())
                if self.slots is not None:
                    trajectory.slots = self.slots.claim(per_prompt)
                    trajectory.main = self.slots.context(trajectory.slots[0], system)
                trajectory.text_cfg = trajectory.main  # round 1's: the system prompt alone, a prefix of main
                self._live.append(trajectory)

    def _advance(self, trajectories: list[_Trajectory]) -> None:
        """One packed forward for ``trajectories``' blocks (think tokens of contexts in slots through the
        static-shape decoder when there is one), then each trajectory takes its result. If the forward
        fails, each request's trajectories run again alone, so only a request whose own blocks fail
        gets the error; a trajectory whose own step fails fails its request."""
        try:
            decoded = self._decode_in_slots(trajectories)
            packed = [t for t in trajectories if id(t) not in decoded]
            plans = [self._plan(t) for t in packed]
            caches = [c for plan in plans for c, _ in plan]
            blocks = [b for plan in plans for _, b in plan]
            hidden, extended = self.model.forward_blocks(caches, blocks) if blocks else ([], [])
        except Exception as error:  # noqa: BLE001
            requests = list(dict.fromkeys(t.generation for t in trajectories))
            if len(requests) == 1:
                log.warning("an iteration of one request failed: %s: %s", type(error).__name__, error)
                self._finish(requests[0], error)
                return
            log.warning("an iteration of %d requests failed (%s: %s); each runs it again alone", len(requests),
                        type(error).__name__, error)
            for generation in requests:
                self._advance([t for t in trajectories if t.generation is generation])
            return
        owns = list(_slices(len(plan) for plan in plans))
        logits = self._think_logits(packed, owns, hidden)
        results = {id(t): (hidden[own], extended[own], None) for t, own in zip(packed, owns)}
        results.update({key: ([], [cache], None) for key, (_, cache) in decoded.items()})
        logits.update({key: row for key, (row, _) in decoded.items()})
        if logits:  # every think token of the iteration sampled at once, each row with its own generator
            thinking = [t for t in trajectories if id(t) in logits]
            tokens = next_tokens(torch.stack([logits[id(t)] for t in thinking]),
                                 [t.request.think_temperature for t in thinking], [t.generator for t in thinking])
            for t, token in zip(thinking, tokens):
                results[id(t)] = (*results[id(t)][:2], token)
        for trajectory in trajectories:
            if trajectory.generation.done:  # its request failed earlier in this loop
                continue
            try:
                self._commit(trajectory, *results[id(trajectory)])
            except Exception as error:  # noqa: BLE001 - a failing callback or decode fails its own request
                self._finish(trajectory.generation, error)

    def _decode_in_slots(self, trajectories: list[_Trajectory]) -> dict[int, tuple[torch.Tensor, KVCache]]:
        """Think tokens of contexts that can grow in their slot, through the static-shape decoder:
        per trajectory (by id) its logits and its context one token longer."""
        if self.decoder is None:
            return {}
        thinking = [(t, self.slots.appendable_slot(t.decoding)) for t in trajectories if t.phase is Phase.THINK]
        thinking = [(t, slot) for t, slot in thinking if slot is not None]
        if not thinking:
            return {}
        device = self.pipe.device

        def column(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        try:
            lengths = [t.decoding.length for t, _ in thinking]
            logits = self.decoder(column([t.next_token for t, _ in thinking]), column([slot for _, slot in thinking]),
                                  column(lengths), column([t.decoding.position for t, _ in thinking]), max(lengths))
        except Exception:  # noqa: BLE001 - a faster path that fails (a graph capture): the packed one remains
            log.exception("the static-shape decoder failed; think tokens decode in the packed forward from now on")
            self.decoder = None
            return {}
        return {id(t): (row, self.slots.appended(t.decoding)) for (t, _), row in zip(thinking, logits)}

    def _think_logits(self, trajectories, owns, hidden) -> dict[int, torch.Tensor]:
        """Next-token logits of every thinking trajectory (its blocks ``hidden[own]``), through the LM
        head in one call."""
        thinking = [(t, own) for t, own in zip(trajectories, owns) if t.phase is Phase.THINK]
        if not thinking:
            return {}
        rows = torch.cat([hidden[own.start][-1:] for _, own in thinking])
        return dict(zip([id(t) for t, _ in thinking], self.model.next_token_logits(rows)))

    # ------------------------------------------------------------------ what each phase runs

    def _plan(self, t: _Trajectory) -> list[tuple[KVCache, object]]:
        """(context, block) pairs that advance ``t`` by one step of its phase."""
        model, pipe = self.model, self.pipe
        if t.phase is Phase.PROMPT:
            return [(t.main, model.text_block(t.main, pipe.wrap(t.request.prompts[t.index])))]
        if t.phase is Phase.THINK:
            ids = torch.tensor([t.next_token], device=pipe.device)
            return [(t.decoding, model.text_block(t.decoding, ids))]
        if t.phase is Phase.APPEND_THINK:
            ids = pipe.wrap(t.think_text)
            if t.round == 1 and t.slots:  # the image-free context forks from main: into its own slot
                t.text_only = self.slots.context(t.slots[1], t.text_only)
            contexts = [t.main] if t.round == 0 else [t.main, t.text_only]
            return [(c, model.text_block(c, ids)) for c in contexts]
        if t.phase is Phase.DENOISE:
            time_now = float(t.times[t.step])
            need_text, need_img = guided_branches(time_now, t.request.round_settings[t.round])
            if self._reuses(t, need_text, need_img):
                return []
            contexts = [t.main] + [t.text_cfg] * need_text + [t.text_only] * need_img
            return [(c, model.noised_latent_block(c, t.x, time_now, t.position_ids)) for c in contexts]
        if t.phase is Phase.FEED_VAE:
            tokens, positions, _ = t.fed
            return [(t.main, model.vae_image_block(t.main, tokens, positions))]
        if t.phase is Phase.FEED_VIT:
            return [(t.main, model.image_block(t.main, t.fed[2], generation_expert=False))]
        raise AssertionError(f"a trajectory in phase {t.phase} has nothing to run")

    def _commit(self, t: _Trajectory, hidden: list[torch.Tensor], extended: list[KVCache | None],
                token: int | None) -> None:
        """Take this iteration's result and move ``t`` on."""
        if t.phase is Phase.PROMPT:
            t.main = extended[0]
            self._start_round(t)
        elif t.phase is Phase.THINK:
            self._take_token(t, token, extended[0])
        elif t.phase is Phase.APPEND_THINK:
            t.main = extended[0]
            t.text_only = extended[0] if t.round == 0 else extended[1]
            self._start_image(t)
        elif t.phase is Phase.DENOISE:
            self._take_step(t, hidden)
        elif t.phase is Phase.FEED_VAE:
            t.main, t.phase = extended[0], Phase.FEED_VIT
        elif t.phase is Phase.FEED_VIT:
            t.main, t.fed = extended[0], None
            t.text_cfg = t.main  # the next image's text-unconditional context: everything but the reflection
            t.round += 1
            t.round_start = time.perf_counter()
            self._start_round(t)

    def _start_round(self, t: _Trajectory) -> None:
        given = t.request.think_texts[t.index][t.round]
        if given is None:
            t.phase, t.decoding, t.think_ids, t.next_token = Phase.THINK, t.main, [], self.pipe.im_start
        else:
            self._end_think(t, given)

    def _take_token(self, t: _Trajectory, token: int, decoding: KVCache) -> None:
        if token == self.pipe.im_end:
            self._end_think(t, self.pipe.tokenizer.decode(t.think_ids))
            return
        t.decoding, t.next_token = decoding, token
        t.think_ids.append(token)
        t.generation.emit(PipelineEvent("think_token", t.round, t.index, text=self.pipe.tokenizer.decode(t.think_ids)))
        if len(t.think_ids) >= t.request.max_think_tokens:
            self._end_think(t, self.pipe.tokenizer.decode(t.think_ids))

    def _end_think(self, t: _Trajectory, text: str) -> None:
        if t.decoding is not None:
            t.decoding.release_to(t.main)  # the think is prefilled again from its text, in place
        t.decoding, t.think_ids, t.think_text = None, [], text
        t.think_end = time.perf_counter()
        t.output.texts.append(text)
        t.output.timings[f"round{t.round + 1}_think_s"] = t.think_end - t.round_start
        t.phase = Phase.APPEND_THINK
        t.generation.emit(PipelineEvent("think_done", t.round, t.index, text=text))

    def _start_image(self, t: _Trajectory) -> None:
        request = t.request
        given = request.images[t.index][t.round]
        if given is not None:
            self._end_image(t, given, None)
            return
        unit = self.config.pixels_per_latent_token
        t.grid = (request.height // unit, request.width // unit)
        shape = (t.grid[0] * t.grid[1], self.config.latent_channels)
        settings = request.round_settings[t.round]
        t.x = self.pipe.noise(request.init_noise[t.round], t.index, shape, t.generator).float()
        t.times = flow_timesteps(request.num_steps, settings.timestep_shift)
        if settings.start_noise is not None and t.round > 0:
            previous = t.previous_latent
            if previous.shape != t.x.shape:
                raise InvalidRequestError(f"round_settings: start_noise in round {t.round + 1} needs round "
                                          f"{t.round}'s image at the same size ({tuple(previous.shape)} latent "
                                          f"tokens, this round {tuple(t.x.shape)})")
            t.times = restart_times(t.times, settings.start_noise)
            level = float(t.times[0])
            t.x = (1 - level) * previous.to(t.x) + level * t.x
        t.position_ids = grid_position_ids(*t.grid, self.config.max_latent_size, device=self.pipe.device)
        t.step, t.phase = 0, Phase.DENOISE
        if len(t.times) == 1:  # start_noise 0: nothing to denoise
            self._finish_denoising(t)

    def _reuses(self, t: _Trajectory, need_text: bool, need_img: bool) -> bool:
        """Whether ``t``'s step reuses earlier ones (step caching) instead of running the model: off
        unless its round's settings ask, and never before the model ran the branches it needs."""
        settings = t.request.round_settings[t.round]
        if runs_model(t.step, len(t.times) - 1, settings):
            return False
        needed = ("cond",) + ("text",) * need_text + ("img",) * need_img
        points = 1 if settings.step_cache_order == 0 else 2
        return len(t.evaluated) >= points and all(
            branches.get(name) is not None for _, branches in t.evaluated[-points:] for name in needed)

    def _take_step(self, t: _Trajectory, hidden: list[torch.Tensor]) -> None:
        settings = t.request.round_settings[t.round]
        time_now = float(t.times[t.step])
        need_text, need_img = guided_branches(time_now, settings)
        if hidden:
            velocities = iter(self.model.velocity(h)[None] for h in hidden)
            branches = {"cond": next(velocities), "text": next(velocities) if need_text else None,
                        "img": next(velocities) if need_img else None}
            if settings.step_cache_interval > 1:
                t.evaluated = [*t.evaluated[-1:], (time_now, branches)]
        else:
            branches = self._extrapolated(t, time_now, settings.step_cache_order)
        v_cond = branches["cond"]
        v_text = branches["text"] if need_text else None
        v_img = branches["img"] if need_img else None
        v = combine_cfg(v_cond, v_text, v_img, settings) if need_text else v_cond
        evaluations = len(t.times) - 1
        detail = StepResult(t.step, evaluations, time_now, t.x[None], v_cond, v_text, v_img, v, reused=not hidden)
        t.x = t.x - v[0] * (t.times[t.step] - t.times[t.step + 1])
        t.step += 1
        t.generation.emit(PipelineEvent("step", t.round, t.index, step=t.step, num_steps=evaluations, detail=detail))
        if t.step == evaluations:
            self._finish_denoising(t)

    def _finish_denoising(self, t: _Trajectory) -> None:
        t.latent, t.phase = t.x.cpu(), Phase.DECODE
        t.job = self._image_work(lambda x, grid: self.pipe.decode_latents(x, grid)[0], t.x[None], t.grid)

    @staticmethod
    def _extrapolated(t: _Trajectory, time_now: float, order: int) -> dict:
        """Each branch's velocity at ``time_now`` from the model's last runs: the last one (order 0),
        or the line through the last two (order 1, a first-order Taylor step in t)."""
        last_t, last = t.evaluated[-1]
        if order == 0:
            return dict(last)
        before_t, before = t.evaluated[-2]
        scale = (time_now - last_t) / (last_t - before_t)
        return {name: None if v is None or before[name] is None else v + (v - before[name]) * scale
                for name, v in last.items()}

    def _end_image(self, t: _Trajectory, image: Image.Image, latent: torch.Tensor | None) -> None:
        t.x = t.times = t.position_ids = None
        t.evaluated, t.previous_latent = [], latent
        output, request = t.output, t.request
        output.images.append(image)
        output.latents.append(latent)
        output.timings[f"round{t.round + 1}_image_s"] = time.perf_counter() - t.think_end
        t.generation.emit(PipelineEvent("image", t.round, t.index, image=image))
        if t.round + 1 == request.rounds:
            self._retire(t)
            return
        width, height = ImageTransform(*request.vae_transform).target_size(*image.size)
        ae = self.config.ae
        shape = (ae.z_channels, height // ae.downsample, width // ae.downsample)
        given = request.vae_encode_noise[t.round]
        if given is not None and given.shape[0] == 1:
            given = given[0]
        noise = self.pipe.noise(given, t.index, shape, t.generator)  # drawn here, in the prompt's order of draws
        t.latent, t.phase = None, Phase.ENCODE
        t.job = self._image_work(self._encode, image, request, noise)

    def _image_work(self, fn, *args) -> Future:
        """``fn(*args)`` in the image thread (on CUDA in its own stream, finished before the result is
        taken), so a round's decode or encode does not stall the other prompts' iterations."""
        def run():
            with torch.no_grad():
                if self._image_stream is None:
                    return fn(*args)
                self._image_stream.wait_stream(torch.cuda.default_stream(self._image_stream.device))
                with torch.cuda.stream(self._image_stream):
                    result = fn(*args)
                self._image_stream.synchronize()
                return result

        return self._images.submit(run)

    def _encode(self, image: Image.Image, request: GenerationRequest, noise: torch.Tensor) -> tuple:
        """A round's image as its context takes it back: clean VAE latent tokens and their positions,
        then ViT tokens."""
        pipe, config = self.pipe, self.config
        pixels = ImageTransform(*request.vae_transform)(image).to(pipe.device, pipe.dtype)
        latent = pipe.autoencoder.encode(pixels[None], noise=noise[None].to(pipe.dtype))[0]
        patch = config.latent_patch_size
        grid = (latent.shape[1] // patch, latent.shape[2] // patch)
        positions = grid_position_ids(*grid, config.max_latent_size, device=pipe.device)
        patches, vit_positions = patchify_image(ImageTransform(*request.vit_transform)(image),
                                                config.vit.patch_size, config.vit_max_num_patch_per_side)
        (vit,) = self.model.vit_embeds([patches.to(pipe.device, pipe.dtype)], [vit_positions.to(pipe.device)])
        return patchify_latent(latent, patch), positions, vit

    # ------------------------------------------------------------------ endings

    def _retire(self, t: _Trajectory) -> None:
        """A trajectory that drew its last image leaves; its request ends with its last one."""
        self._live.remove(t)
        self._release(t)
        generation = t.generation
        generation._remaining -= 1
        if generation._remaining == 0:
            total = time.perf_counter() - generation.submitted
            for output in generation.outputs:
                output.timings["total_s"] = total
            try:
                generation.emit(PipelineEvent("done", generation.request.rounds - 1))
            except Exception as error:  # noqa: BLE001
                generation._complete(error)
                return
            generation._complete()

    def _finish(self, generation: Generation, error: BaseException) -> None:
        """``generation`` ends with ``error``: its trajectories leave and their caches are freed."""
        if generation.done:
            return
        for t in [t for t in self._live if t.generation is generation]:
            self._live.remove(t)
            self._release(t)
        generation._complete(error)


    def _release(self, t: _Trajectory) -> None:
        """``t`` holds no cache any more; its slots are free for the next request."""
        if t.job is not None:  # image work nobody will take
            t.job.cancel()
            t.job = None
        t.main = t.text_cfg = t.text_only = t.decoding = t.fed = None
        if t.slots:
            self.slots.release(t.slots)
            t.slots = []


def _slices(lengths):
    """Consecutive slices of the given lengths."""
    start = 0
    for length in lengths:
        yield slice(start, start + length)
        start += length


def slots_per_prompt(request: GenerationRequest) -> int:
    """KV slots a prompt of ``request`` holds: main, and the image-free context from round 2."""
    return 1 if request.rounds == 1 else 2


def kv_slots(pipe: IRGPipeline, num_slots: int, slot_tokens: int) -> KVSlots:
    """KV slots for ``pipe``'s model, on its device and in its dtype."""
    llm = pipe.config.llm
    return KVSlots(num_slots, slot_tokens, llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim,
                   pipe.device, pipe.dtype)


def context_tokens(pipe: IRGPipeline, request: GenerationRequest, prompt_tokens: int) -> int:
    """The most tokens a main context may hold in ``request`` for a prompt of ``prompt_tokens`` (think
    texts at their budget): the system prompt, the prompt, every think, every earlier image fed back
    (VAE and ViT tokens), and the larger of a think being sampled and an image being denoised."""
    config = pipe.config
    vae_w, vae_h = ImageTransform(*request.vae_transform).target_size(request.width, request.height)
    vit_w, vit_h = ImageTransform(*request.vit_transform).target_size(request.width, request.height)
    unit, patch = config.pixels_per_latent_token, config.vit.patch_size
    fed_back = vae_w // unit * (vae_h // unit) + vit_w // patch * (vit_h // patch) + 4
    drawn = request.height // unit * (request.width // unit) + 2
    think = request.max_think_tokens + 2
    text = len(pipe.wrap(request.system_prompt)) + prompt_tokens
    return text + request.rounds * think + (request.rounds - 1) * fed_back + max(drawn, think)


def longest_context(pipe: IRGPipeline, request: GenerationRequest) -> int:
    """The most tokens any of ``request``'s main contexts may hold (:func:`context_tokens`)."""
    return max(context_tokens(pipe, request, len(pipe.wrap(p))) for p in request.prompts)
