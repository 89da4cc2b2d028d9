"""Isolation and hygiene of the generator service, without a Serve cluster: what a client reads of an
error, a stream's keep-alive and deadline, one failing request in a batch, and the metrics' arithmetic."""

import asyncio

import pytest

from irg.pipeline import PipelineEvent
from irg.serve.batching import run_isolated
from irg.serve.errors import public_error, scrub
from irg.serve.metrics import GenerationMeter
from irg.serve.streaming import StreamTimeout, paced


class RemoteError(ValueError):
    """Stands for Ray's RayTaskError(ValueError): its text is the remote traceback, its ``cause`` the error."""

    def __init__(self, cause: BaseException):
        super().__init__(
            "ray::ServeReplica:irg:Generator.handle_request() (pid=4711, ip=10.1.2.3, actor_id=ab12)\n"
            '  File "/opt/venv/lib/python3.11/site-packages/ray/serve/_private/replica.py", line 9, in call\n'
            f"{type(cause).__name__}: {cause}")
        self.cause = cause


def test_a_refused_request_keeps_its_message_and_loses_ray_s_traceback():
    error = public_error(RemoteError(ValueError("steps: 1 is below the minimum of 2")), "r1")
    assert (error.status, error.message) == (400, "steps: 1 is below the minimum of 2")


def test_a_server_failure_names_its_kind_and_request_id_only():
    error = public_error(RemoteError(RuntimeError("CUDA out of memory in /opt/irg/irg/model/attention.py")), "r42")
    assert error.status == 500 and not error.client_fault
    assert error.message == ("the generation failed (RuntimeError); the server's log has the details under "
                             "request id r42")
    assert public_error(KeyError("x")).message == "the generation failed (KeyError)"


@pytest.mark.parametrize(("message", "expected"), [
    ("images[0]: cannot read /srv/models/irg/shapes/x.png", "images[0]: cannot read <path>"),
    ("size: 65 is not a multiple of 16 (pid=12, ip=10.0.0.2)", "size: 65 is not a multiple of 16"),
    ("seed: bad\nTraceback (most recent call last):\n  File \"/a/b.py\"", "seed: bad"),
    ("size: 64x64/2 and v1/models stay", "size: 64x64/2 and v1/models stay"),  # not absolute paths
])
def test_scrub_takes_out_paths_pids_and_tracebacks(message, expected):
    assert scrub(message) == expected


def test_an_error_message_that_is_only_a_traceback_becomes_a_server_error():
    error = public_error(ValueError("Traceback (most recent call last):\n  File \"/x/y.py\", line 1"), "r7")
    assert error.status == 500 and "/x/y.py" not in error.message


# --- the stream's pace ----------------------------------------------------------------------------------


async def collect(source, keep_alive_s, timeout_s):
    items = []
    try:
        async for item in paced(source, keep_alive_s, timeout_s):
            items.append(item)
    except StreamTimeout as timeout:
        items.append(timeout)
    return items


def test_a_silent_stream_gets_keep_alives_and_ends_at_its_deadline():
    gone = asyncio.Event()

    async def silent():
        try:
            await asyncio.sleep(3600)
            yield "never"
        finally:
            gone.set()

    async def main():
        started = asyncio.get_running_loop().time()
        items = await collect(silent(), keep_alive_s=0.05, timeout_s=0.32)
        await asyncio.sleep(0)  # the cancelled read unwinds
        return items, asyncio.get_running_loop().time() - started, gone.is_set()

    items, elapsed, read_cancelled = asyncio.run(main())
    *alive, timeout = items
    assert isinstance(timeout, StreamTimeout) and str(timeout) == "generation took over 0.32 s"
    assert alive == [None] * len(alive) and 4 <= len(alive) <= 7, alive
    assert 0.3 <= elapsed < 1.0, elapsed
    assert read_cancelled


def test_a_lively_stream_passes_its_items_in_order_and_ends_with_them():
    async def lively():
        for i in range(3):
            await asyncio.sleep(0.01)
            yield i

    assert asyncio.run(collect(lively(), keep_alive_s=5, timeout_s=5)) == [0, 1, 2]


def test_the_deadline_holds_even_while_items_keep_coming():
    async def endless():
        while True:
            await asyncio.sleep(0.01)
            yield "x"

    *items, timeout = asyncio.run(collect(endless(), keep_alive_s=5, timeout_s=0.2))
    assert isinstance(timeout, StreamTimeout) and 5 <= len(items) <= 25 and set(items) == {"x"}


# --- one failing member of a batch ----------------------------------------------------------------------


def test_a_failing_job_fails_alone_and_the_others_of_its_batch_get_their_results():
    calls, retried = [], []

    async def run(jobs):
        calls.append(list(jobs))
        if "poison" in jobs:
            raise RuntimeError("broken input")
        return [f"image of {job}" for job in jobs]

    results = asyncio.run(run_isolated(["a", "poison", "b"], run, lambda job, error: retried.append(job)))
    assert results[0] == "image of a" and results[2] == "image of b"
    assert isinstance(results[1], RuntimeError) and str(results[1]) == "broken input"
    assert calls == [["a", "poison", "b"], ["a"], ["poison"], ["b"]]
    assert retried == ["a", "poison", "b"]  # each hears it starts over (a stream resets what it showed)


def test_a_batch_that_succeeds_runs_once():
    calls = []

    async def run(jobs):
        calls.append(jobs)
        return [job.upper() for job in jobs]

    assert asyncio.run(run_isolated(["a", "b"], run)) == ["A", "B"] and calls == [["a", "b"]]


def test_a_lone_failing_job_gets_its_exception_without_a_rerun():
    calls = []

    async def run(jobs):
        calls.append(jobs)
        raise ValueError("bad")

    [result] = asyncio.run(run_isolated(["x"], run))
    assert isinstance(result, ValueError) and calls == [["x"]]


# --- the metrics' arithmetic ----------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_meter_measures_think_speed_step_time_and_time_to_first_image():
    clock, records = Clock(), []
    # Two requests: the first (1 prompt) arrived at 99, the second (2 prompts) at 99.5; the call starts at 100.
    meter = GenerationMeter([99.0, 99.5], [1, 2], lambda name, value: records.append((name, value)), clock)

    def at(time, kind, **fields):
        clock.now = time
        meter.observe(PipelineEvent(kind, **fields))

    for t, prompt in [(100.1, 0), (100.1, 1), (100.2, 2), (100.4, 0)]:  # 4 tokens over the three prompts
        at(t, "think_token", round=0, prompt_index=prompt, text="t")
    at(100.5, "think_done", round=0, prompt_index=0, text="t")
    at(100.5, "think_done", round=0, prompt_index=1, text="t")  # the phase ended at the first
    for t, step in [(100.7, 1), (100.9, 2), (101.2, 3)]:
        at(t, "step", round=0, step=step, num_steps=4)
    at(101.3, "image", round=0, prompt_index=0)
    at(101.3, "image", round=0, prompt_index=1)
    at(101.3, "image", round=0, prompt_index=2)  # the second request's first image came with prompt 1
    at(101.8, "think_token", round=1, prompt_index=0, text="r")
    at(102.3, "think_done", round=1, prompt_index=0, text="r")
    at(102.5, "step", round=1, step=1, num_steps=2)
    at(103.0, "image", round=1, prompt_index=0)  # not a first image any more

    by_name: dict = {}
    for name, value in records:
        by_name.setdefault(name, []).append(round(value, 6))
    assert by_name == {
        "think_tokens": [4, 1],
        "think_tokens_per_s": [round(4 / 0.5, 6), round(1 / 1.0, 6)],  # round 2's phase began at the last image
        "denoise_step_s": [0.2, 0.3],  # from step 1 to 2 and 2 to 3; a round's first step holds the prefill
        "time_to_first_image_s": [2.3, 1.8],
    }


def test_given_thinks_record_no_think_speed():
    records = []
    meter = GenerationMeter([0.0], [1], lambda name, value: records.append(name), Clock())
    meter.observe(PipelineEvent("think_done", round=0, prompt_index=0, text="given"))
    meter.observe(PipelineEvent("image", round=0, prompt_index=0))
    assert records == ["time_to_first_image_s"]


# --- the generator replica's class, in-process -----------------------------------------------------------

SMALL = {"size": "64x64", "steps": 3, "rounds": 2, "max_think_tokens": 4, "seed": 7}


@pytest.fixture
def poisoned_generator(monkeypatch):
    """The call-at-a-time Generator deployment's class on the tiny model, whose pipeline fails any batch
    holding the prompt "poison" (as a prompt that breaks the shared forward would)."""
    from conftest import FIXTURE_DIR

    from serve_apps.irg_app import CallGenerator

    generator = CallGenerator.func_or_class(str(FIXTURE_DIR), "cpu", "float32")
    generator.batching = generator.batching.model_copy(update={"batch_wait_timeout_s": 0.3})  # streams' wait
    real = generator.pipe.generate

    def generate(request, callback=None):
        if "poison" in request.prompts:
            raise RuntimeError("this batch holds a poisoned prompt")
        return real(request, callback)

    monkeypatch.setattr(generator.pipe, "generate", generate)
    return generator


def test_a_failing_json_request_fails_alone_and_its_batch_mates_get_their_images(poisoned_generator):
    """The batch ``serve.batch`` hands the replica, called as it calls it. (Not through ``serve.batch``
    itself: its queue, made at the first call, lives on the class and would then keep the class from
    being pickled for the Serve apps of later tests.)"""
    from serve_apps.irg_app import CallGenerator

    generator = poisoned_generator
    run_batch = CallGenerator.func_or_class._generate_batched.__wrapped__
    jobs = [generator._job({"prompt": p, **SMALL}) for p in ("a red cube", "poison", "a blue ball")]
    cube, poison, ball = asyncio.run(run_batch(generator, jobs))
    assert isinstance(poison, RuntimeError) and "poisoned" in str(poison)
    for outputs in (cube, ball):
        assert len(outputs) == 1 and len(outputs[0].images) == 2
    stats = generator.stats()
    # one shared call that failed, then each alone: two images, one more failure
    assert (stats["largest_batch"], stats["completed"], stats["failed"]) == (3, 2, 2), stats
    assert generator.metrics._waiting == 0  # the queue-depth gauge is back to empty


def test_a_failing_stream_fails_alone_and_its_batch_mates_restart_and_finish(poisoned_generator):
    generator = poisoned_generator

    async def consume(body):
        events = []
        try:
            async for name, _ in generator.stream(body):
                events.append(name)
        except RuntimeError as error:
            events.append(error)
        return events

    async def main():
        return await asyncio.gather(*(consume({"prompt": p, **SMALL}) for p in ("a red cube", "poison")))

    cube, poison = asyncio.run(main())
    assert cube[0] == "restart" and cube[-1] == "done" and cube.count("image") == 2, cube
    assert poison[0] == "restart" and isinstance(poison[-1], RuntimeError) and len(poison) == 2, poison
    assert generator.metrics._waiting == 0


# --- the engine's replica class, in-process ----------------------------------------------------------

POISON = "poison " * 12  # a prompt block longer than any other block these requests run


@pytest.fixture
def engine_generator(monkeypatch):
    """The (engine) Generator deployment's class on the tiny model, whose forward fails on the blocks of
    the prompt ``POISON`` (as a prompt that breaks a shared forward would)."""
    from conftest import FIXTURE_DIR

    from serve_apps.irg_app import Generator

    generator = Generator.func_or_class(str(FIXTURE_DIR), "cpu", "float32", kv_slots=8)
    poison_length = len(generator.pipe.wrap(POISON))
    forward = generator.pipe.model.forward_blocks

    def fragile(caches, blocks):
        if any(block.embeds.shape[0] == poison_length for block in blocks):
            raise RuntimeError("a poisoned block")
        return forward(caches, blocks)

    monkeypatch.setattr(generator.pipe.model, "forward_blocks", fragile)
    yield generator
    generator.loop.stop()


def test_in_the_engine_a_failing_request_fails_alone_and_the_others_never_restart(engine_generator):
    generator = engine_generator

    async def consume(body):
        return [name async for name, _ in generator.stream(body)]

    async def main():
        return await asyncio.gather(generator.generate({"prompt": "a red cube", **SMALL}),
                                    generator.generate({"prompt": POISON, **SMALL}),
                                    consume({"prompt": "a blue ball", **SMALL}), return_exceptions=True)

    cube, poison, ball = asyncio.run(main())
    assert isinstance(poison, RuntimeError) and "poisoned" in str(poison)
    assert len(cube["data"][0]["rounds"]) == 2
    assert "restart" not in ball and ball[-1] == "done" and ball.count("image") == 2, ball
    stats = generator.stats()
    assert (stats["completed"], stats["failed"], stats["cancelled"]) == (2, 1, 0), stats
    assert stats["largest_batch"] >= 2 and stats["free_kv_slots"] == stats["kv_slots"] == 8, stats
    assert generator.metrics._waiting == 0  # the queue-depth gauge is back to empty
