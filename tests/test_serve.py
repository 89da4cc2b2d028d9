"""The IRG generator on a real local Ray Serve with the tiny model: streaming, bad requests, batching,
and the application builder's args."""

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from conftest import FIXTURE_DIR
from PIL import Image
from pydantic import ValidationError
from ray import serve

from irg.serve.api import parse_sse
from irg.serve.options import AppArgs

pytestmark = pytest.mark.integration

SMALL = {"size": "64x64", "steps": 4, "rounds": 2, "max_think_tokens": 8, "seed": 7}


@pytest.fixture(scope="module")
def server(serve_url):
    return serve_url


def read_events(response):
    return parse_sse(response.iter_lines(decode_unicode=True))


def test_a_streamed_request_yields_its_events_in_order(server):
    with requests.post(f"{server}/v1/images/generations/stream", json={"prompt": "a red cube", **SMALL},
                       stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(read_events(response))
    kinds = [name for name, _ in events if name != "think_delta"]
    updates = SMALL["steps"] - 1  # `steps` timesteps from noise to image: steps - 1 updates
    expected = (["think"] + ["step"] * updates + ["image"]) * 2 + ["done"]
    assert kinds == expected
    # Each think streams token by token before it is whole: its deltas rebuild it exactly.
    built: dict = {}
    for name, data in events:
        if name == "think_delta":
            built[data["round"]] = built.get(data["round"], "")[: data["offset"]] + data["delta"]
        elif name == "think":
            assert built.pop(data["round"]) == data["text"]
    assert built == {}
    assert sum(name == "think_delta" for name, _ in events) > 2
    assert [d["round"] for n, d in events if n in ("think", "image")] == [1, 1, 2, 2]
    for name, data in events:
        if name == "image":
            image = Image.open(io.BytesIO(base64.b64decode(data["b64_png"])))
            assert image.format == "PNG" and image.size == (64, 64)

    # The JSON endpoint gives the same images for the same seed.
    body = requests.post(f"{server}/v1/images/generations", json={"prompt": "a red cube", **SMALL}, timeout=120).json()
    rounds = body["data"][0]["rounds"]
    assert [r["b64_png"] for r in rounds] == [d["b64_png"] for n, d in events if n == "image"]
    assert [r["text"] for r in rounds] == [d["text"] for n, d in events if n == "think"]


BAD_REQUESTS = [
    {"prompt": ""}, {"prompt": "x" * 5000}, {}, {"prompt": 3}, {"prompt": "a", "n": 0}, {"prompt": "a", "n": 9},
    {"prompt": "a", "size": "65x64"}, {"prompt": "a", "size": "big"}, {"prompt": "a", "size": "64x64x64"},
    {"prompt": "a", "size": "16x99999"}, {"prompt": "a", "steps": 1}, {"prompt": "a", "steps": 10_000},
    {"prompt": "a", "steps": "many"}, {"prompt": "a", "rounds": 0}, {"prompt": "a", "rounds": 50},
    {"prompt": "a", "seed": -1}, {"prompt": "a", "max_think_tokens": 0}, {"prompt": "a", "colour": "red"},
    ["a", "list"], "not json",
]


def assert_no_internals(text: str) -> None:
    """An error a client reads names the problem, never the server's insides (Ray's remote traceback)."""
    for inside in ("Traceback", 'File "', "pid=", "ray::", "site-packages", str(FIXTURE_DIR)):
        assert inside not in text, (inside, text[:500])


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/generations/stream"])
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, path):
    assert len(BAD_REQUESTS) == 20
    for bad in BAD_REQUESTS:
        if isinstance(bad, str):
            response = requests.post(f"{server}{path}", data=bad, headers={"content-type": "application/json"},
                                     timeout=60)
        else:
            response = requests.post(f"{server}{path}", json=bad, timeout=60)
        assert 400 <= response.status_code < 500, (bad, response.status_code, response.text[:300])
        assert response.json()["detail"], bad
        assert_no_internals(response.text)
    assert requests.get(f"{server}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{server}/v1/models", timeout=30).json()["data"][0]["id"] == str(FIXTURE_DIR)
    ok = requests.post(f"{server}/v1/images/generations", json={"prompt": "a blue ball", **SMALL}, timeout=120)
    assert ok.status_code == 200 and len(ok.json()["data"][0]["rounds"]) == 2


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    generator = serve.get_deployment_handle("Generator", app_name="irg")
    before = generator.stats.remote().result()
    long = {"prompt": "many shapes", "size": "256x256", "steps": 200, "rounds": 4, "max_think_tokens": 8}
    with requests.post(f"{server}/v1/images/generations/stream", json=long, stream=True, timeout=120) as response:
        events = read_events(response)
        assert next(e for e in events if e[0] == "step")  # the generation is under way
    # The connection is closed: the generation stops at its next step instead of running to the end.
    deadline = time.monotonic() + 60
    while generator.stats.remote().result()["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the abandoned generation was not cancelled"
        time.sleep(0.2)
    after = generator.stats.remote().result()
    assert after["completed"] == before["completed"]
    ok = requests.post(f"{server}/v1/images/generations", json={"prompt": "a blue ball", **SMALL}, timeout=120)
    assert ok.status_code == 200


def test_a_json_client_that_disconnects_stops_its_generation(server):
    generator = serve.get_deployment_handle("Generator", app_name="irg")
    before = generator.stats.remote().result()
    long = {"prompt": "many shapes", "size": "256x256", "steps": 200, "rounds": 4, "max_think_tokens": 8}
    with pytest.raises(requests.exceptions.ReadTimeout):  # the client gives up and closes the connection
        requests.post(f"{server}/v1/images/generations", json=long, timeout=(10, 1.5))
    deadline = time.monotonic() + 20
    while generator.stats.remote().result()["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the abandoned JSON generation was not cancelled"
        time.sleep(0.2)
    assert generator.stats.remote().result()["completed"] == before["completed"]


def test_concurrent_requests_of_one_shape_share_a_batch_and_keep_their_own_images(server):
    import numpy as np

    generator = serve.get_deployment_handle("Generator", app_name="irg")
    bodies = [{"prompt": p, **SMALL, "seed": s} for p, s in (("a red cube", 1), ("two balls", 2), ("a cone", 3))]
    alone = [requests.post(f"{server}/v1/images/generations", json=b, timeout=120).json() for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: requests.post(f"{server}/v1/images/generations", json=b,
                                                         timeout=120).json(), bodies))
    assert generator.stats.remote().result()["largest_batch"] >= 2

    def pixels(body):
        return [np.asarray(Image.open(io.BytesIO(base64.b64decode(r["b64_png"])))).astype(int)
                for r in body["data"][0]["rounds"]]

    for a, b in zip(alone, together):
        assert [r["text"] for r in a["data"][0]["rounds"]] == [r["text"] for r in b["data"][0]["rounds"]]
        for x, y in zip(pixels(a), pixels(b)):
            assert np.abs(x - y).max() <= 2  # the same image, up to float reordering in a bigger forward


def test_a_full_queue_answers_503_and_a_slow_request_times_out(server):
    """A one-slot app beside the main one: one running, one queued, the rest turned away at once."""
    from serve_apps.irg_app import bind_app

    one_slot = bind_app(AppArgs(model=str(FIXTURE_DIR), device="cpu", request_timeout_s=0.5), max_ongoing_requests=1,
                        max_queued_requests=1, autoscaling_config=None, num_replicas=1)
    serve.run(one_slot, name="one-slot", route_prefix="/one-slot")
    slow = {"prompt": "slow", "size": "256x256", "steps": 100, "rounds": 2, "max_think_tokens": 8}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: requests.post(f"{server}/one-slot/v1/images/generations", json=slow,
                                                          timeout=120), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 504 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "5" and "busy" in busy.json()["detail"]
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200
    # The timed-out JSON request stops its generation at the next step, as a stream does, instead of
    # keeping the replica busy to the end.
    generator = serve.get_deployment_handle("Generator", app_name="one-slot")
    deadline = time.monotonic() + 10
    while generator.stats.remote().result()["cancelled"] == 0:
        assert time.monotonic() < deadline, "the timed-out generation was not cancelled"
        time.sleep(0.2)
    assert generator.stats.remote().result()["completed"] == 0
    serve.delete("one-slot")


def test_concurrent_streams_share_iterations_and_get_only_their_own_events(server):
    generator = serve.get_deployment_handle("Generator", app_name="irg")
    bodies = [{"prompt": p, **SMALL, "seed": s} for p, s in (("a green cone", 11), ("three cubes", 12))]

    def stream(body):
        with requests.post(f"{server}/v1/images/generations/stream", json=body, stream=True, timeout=120) as r:
            assert r.status_code == 200
            return list(read_events(r))

    solo = [stream(b) for b in bodies]
    before = generator.stats.remote().result()["completed"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(stream, bodies))
    stats = generator.stats.remote().result()
    assert stats["completed"] == before + 2 and stats["largest_batch"] >= 2, stats  # iterations were shared
    for alone, shared in zip(solo, together):
        assert [name for name, _ in shared] == [name for name, _ in alone]  # own events only, in order
        assert all(d["index"] == 0 for n, d in shared if n in ("think", "image"))  # renumbered per stream
        assert [d["text"] for n, d in shared if n == "think"] == [d["text"] for n, d in alone if n == "think"]


def test_serve_validates_the_builder_args_by_name_and_dtype_bf16_builds():
    # What `serve run serve_apps.irg_app:app key=value ...` and a config's `args` go through.
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as build

    from serve_apps.irg_app import app

    with pytest.raises(ValidationError, match=r"(?m)^colour\n.*Extra inputs are not permitted"):
        build(app, {"model": str(FIXTURE_DIR), "colour": "red"})
    with pytest.raises(ValidationError, match=r"(?m)^dtype\n.*unknown dtype 'bf17'"):
        build(app, {"model": str(FIXTURE_DIR), "dtype": "bf17"})
    assert type(build(app, {"model": str(FIXTURE_DIR), "dtype": "bf16"})).__name__ == "Application"


def test_a_call_at_a_time_generator_loads_in_bf16_and_reconfigure_sets_its_batching():
    from serve_apps.irg_app import BATCHING, CallGenerator

    generator = CallGenerator.func_or_class(str(FIXTURE_DIR), "cpu", "bf16")  # the replica's class, in-process
    assert generator.pipe.dtype == torch.bfloat16
    try:
        generator.reconfigure({"max_batch_size": 2, "batch_wait_timeout_s": 0.5})
        assert generator.stats() == {"completed": 0, "cancelled": 0, "failed": 0, "largest_batch": 0,
                                     "max_batch_size": 2, "batch_wait_timeout_s": 0.5}
        assert generator._generate_batched._get_max_batch_size() == 2
        assert generator._generate_batched._get_batch_wait_timeout_s() == 0.5
        with pytest.raises(ValidationError, match=r"(?m)^max_batch\n"):
            generator.reconfigure({"max_batch": 2})
    finally:
        generator.reconfigure(BATCHING.model_dump())


def test_a_user_config_of_max_batch_size_1_runs_same_shape_requests_one_by_one(server):
    """The call-at-a-time scheduler's user_config reaches the replicas: with batches of one, neither JSON
    requests nor streams share."""
    from serve_apps.irg_app import bind_app

    one = {"max_batch_size": 1, "batch_wait_timeout_s": 0.3}
    serve.run(bind_app(AppArgs(model=str(FIXTURE_DIR), device="cpu", scheduler="call"), user_config=one,
                       num_replicas=1,
                       autoscaling_config=None, ray_actor_options={"num_cpus": 0}),
              name="one-by-one", route_prefix="/one-by-one")
    generator = serve.get_deployment_handle("Generator", app_name="one-by-one")
    assert generator.stats.remote().result().items() >= one.items()
    bodies = [{"prompt": p, **SMALL, "seed": s} for p, s in (("a red cube", 1), ("two balls", 2), ("a cone", 3))]

    def post(body):
        return requests.post(f"{server}/one-by-one/v1/images/generations", json=body, timeout=120).status_code

    def stream(body):
        with requests.post(f"{server}/one-by-one/v1/images/generations/stream", json=body, stream=True,
                           timeout=120) as r:
            return [name for name, _ in read_events(r)][-1]

    with ThreadPoolExecutor(len(bodies)) as pool:
        assert list(pool.map(post, bodies)) == [200] * 3
        assert list(pool.map(stream, bodies)) == ["done"] * 3
    stats = generator.stats.remote().result()
    assert (stats["completed"], stats["largest_batch"]) == (6, 1), stats
    serve.delete("one-by-one")


def test_the_model_list_is_answered_without_waking_a_generator_scaled_to_zero(server):
    from openai import OpenAI

    from serve_apps.irg_app import bind_app

    cold = bind_app(AppArgs(model=str(FIXTURE_DIR), device="cpu"),
                    autoscaling_config={"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
                                        "upscale_delay_s": 0, "downscale_delay_s": 600})
    serve.run(cold, name="cold", route_prefix="/cold")
    try:
        body = requests.get(f"{server}/cold/v1/models", timeout=30).json()
        assert body["object"] == "list" and len(body["data"]) == 1
        model = body["data"][0]
        assert (model["id"], model["object"], model["owned_by"]) == (str(FIXTURE_DIR), "model", "irg")
        assert abs(model["created"] - time.time()) < 600
        client = OpenAI(base_url=f"{server}/cold/v1", api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == [str(FIXTURE_DIR)]
        time.sleep(3)  # an upscale would have started by now (upscale_delay_s 0)
        replicas = serve.status().applications["cold"].deployments["Generator"].replica_states
        assert sum(replicas.values()) == 0, replicas
    finally:
        serve.delete("cold")
