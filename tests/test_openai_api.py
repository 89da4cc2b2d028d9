"""OpenAI Images API compatibility (irg.serve.openai_api): the body, errors, response and stream
conversions without Ray, then the official ``openai`` client against a real local Serve app."""

import base64
import io
import json

import pytest
from PIL import Image

from irg.model.config import tiny_config
from irg.serve.api import GenerationBody
from irg.serve.openai_api import (
    OpenAIError,
    OpenAIImageBody,
    OpenAIStream,
    generation_error,
    openai_response,
    parse_body,
    revised_prompt,
)

MODEL = "irg-tiny"
SMALL = {"steps": 4, "rounds": 2, "max_think_tokens": 8, "seed": 7}


def parse(**values) -> OpenAIImageBody:
    return parse_body(json.dumps(values).encode(), MODEL)


def refused(raw) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        parse_body(raw if isinstance(raw, bytes) else json.dumps(raw).encode(), MODEL)
    body = info.value.body()
    assert set(body["error"]) == {"message", "type", "param", "code"} and info.value.status == 400
    assert body["detail"] == body["error"]["message"]
    return info.value


def png_b64(size=(64, 64), colour=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


REFLECTION = ("<think> The cube is too small.\n\n### Detailed Explanation of Required Improvements:\n- bigger\n\n"
              "### Step-by-Step Modification Guidance:\n1. Enlarge it.\n\n"
              "### Final Comprehensive Prompt for the Improved Image:\nA large red cube on grey. </think>")


def native(n=1, rounds=2) -> dict:
    texts = ["<think> a red cube </think>", REFLECTION, "<think> again"][:rounds]
    return {"created": 5, "model": MODEL,
            "data": [{"seed": 7 + i, "rounds": [{"round": r + 1, "text": texts[r], "b64_png": png_b64(colour=(r, i, 9))}
                                                for r in range(rounds)]} for i in range(n)]}


# --- the body ------------------------------------------------------------------------------------------


def test_a_body_takes_openai_fields_and_irg_extras_and_hands_the_generator_a_native_body():
    body = parse(model=MODEL, prompt="a red cube", n=2, size="64x64", response_format="b64_json", output_format="webp",
                 output_compression=80, quality="hd", style="vivid", background="opaque", user="someone",
                 safety_identifier="x", stream=False, partial_images=1, cfg_text_scale=5.0, cfg_img_scale=1.5, **SMALL)
    native_body = body.native()
    assert set(native_body) == set(GenerationBody.model_fields)
    request = GenerationBody(**native_body).to_request(tiny_config(), default_seed=0)
    assert (request.width, request.height, request.num_steps, request.rounds, request.seeds) == (64, 64, 4, 2, [7, 8])
    assert [(s.cfg_text_scale, s.cfg_img_scale) for s in request.round_settings] == [(5.0, 1.0), (5.0, 1.5)]
    assert parse(prompt="a", size="auto").size is None
    assert parse(prompt="a").native() == GenerationBody(prompt="a").model_dump()  # a native body is a valid one


@pytest.mark.parametrize("raw, param, code", [
    ({"prompt": "a", "model": "dall-e-3"}, "model", "model_not_found"),
    ({"prompt": "a", "colour": "red"}, "colour", "unknown_parameter"),
    ({"prompt": "a", "quality": "ultra"}, "quality", "invalid_value"),
    ({"prompt": "a", "style": "baroque"}, "style", "invalid_value"),
    ({"prompt": "a", "response_format": "png"}, "response_format", "invalid_value"),
    ({"prompt": "a", "output_format": "gif"}, "output_format", "invalid_value"),
    ({"prompt": "a", "background": "transparent"}, "background", "invalid_value"),
    ({"prompt": "a", "n": 5}, "n", "invalid_value"),
    ({"prompt": "a", "size": "65 by 64"}, "size", "invalid_value"),
    ({"prompt": "a", "steps": 1}, "steps", "invalid_value"),
    ({"prompt": "a", "cfg_text_scale": -1}, "cfg_text_scale", "invalid_value"),
    ({"prompt": "a", "moderation": "low"}, "moderation", "unsupported_parameter"),
    ({"prompt": "a", "stream": True, "response_format": "url"}, "response_format", "invalid_value"),
    ({}, "prompt", "invalid_value"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    (["a", "list"], None, None),
    (b"not json", None, None),
])
def test_what_cannot_be_honoured_is_a_400_in_openai_s_shape_naming_the_field(raw, param, code):
    error = refused(raw)
    assert (error.param, error.code) == (param, code)
    if param:
        assert param in error.message


def test_the_generator_s_refusals_name_the_body_field():
    assert generation_error("height: must be a multiple of 16, got 72").param == "size"
    assert generation_error("height: must be a multiple of 16, got 72").message.startswith("size: height: ")
    assert generation_error("num_steps: too many").param == "steps"
    assert generation_error("round_settings[1]: cfg_text_scale must be >= 0").param == "cfg_text_scale"
    assert generation_error("something else").param is None


# --- the response --------------------------------------------------------------------------------------


def test_revised_prompt_is_the_final_comprehensive_prompt_or_the_think():
    assert revised_prompt(["<think> a red cube </think>", REFLECTION]) == "A large red cube on grey."
    assert revised_prompt(["<think> a red cube </think>"]) == "a red cube"
    assert revised_prompt(["<think> a red cube </think>", "<think> no sections here </think>"]) == "no sections here"
    assert revised_prompt(["<think> </think>", ""], prompt="the prompt") == "the prompt"


def test_the_response_has_openai_s_shape_and_the_whole_trajectory():
    from openai.types import ImagesResponse

    body = parse(prompt="a red cube", n=2)
    response = ImagesResponse.model_validate(openai_response(native(n=2), body))
    assert response.created == 5 and response.size == "64x64" and response.output_format == "png"
    assert len(response.data) == 2
    for i, item in enumerate(response.data):
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "PNG" and image.size == (64, 64) and image.getpixel((0, 0)) == (1, i, 9)
        assert item.revised_prompt == "A large red cube on grey."
        assert [r["round"] for r in item.rounds] == [1, 2] and item.model_extra["seed"] == 7 + i
        assert item.rounds[-1]["b64_png"] == native(n=2)["data"][i]["rounds"][-1]["b64_png"]

    jpeg = openai_response(native(), parse(prompt="a", output_format="jpeg", output_compression=50))
    assert Image.open(io.BytesIO(base64.b64decode(jpeg["data"][0]["b64_json"]))).format == "JPEG"


def test_url_responses_store_every_round_and_need_a_store():
    class Store:
        def __init__(self):
            self.files = {}

        def put(self, data, name):
            self.files[name] = data
            return f"https://store.example/{name}?X-Amz-Expires=3600"

    store = Store()
    response = openai_response(native(), parse(prompt="a", response_format="url"), store)
    item = response["data"][0]
    assert item["url"] == item["rounds"][-1]["url"] and "b64_json" not in item and len(store.files) == 2
    assert all(Image.open(io.BytesIO(data)).format == "PNG" for data in store.files.values())
    with pytest.raises(OpenAIError, match="response_format"):
        openai_response(native(), parse(prompt="a", response_format="url"), None)


# --- the stream ----------------------------------------------------------------------------------------


def native_events(rounds=3, n=1):
    for r in range(1, rounds + 1):
        for i in range(n):
            yield "think", {"index": i, "round": r, "text": REFLECTION if r > 1 else "<think> a cube </think>"}
        yield "step", {"index": -1, "round": r, "step": 1, "num_steps": 4}
        for i in range(n):
            yield "image", {"index": i, "round": r, "b64_png": png_b64(colour=(r, i, 0))}
    yield "done", {}


def openai_events(body, rounds=3, n=1):
    stream = OpenAIStream(body, rounds, created=9)
    out = []
    for name, data in native_events(rounds, n):
        for text in stream.event(name, data):
            event, payload = text.split("\n")[:2]
            assert event == f"event: {json.loads(payload.removeprefix('data: '))['type']}"
            out.append(json.loads(payload.removeprefix("data: ")))
    return out


def test_the_stream_sends_earlier_rounds_as_partial_images_and_the_last_as_completed():
    events = openai_events(parse(prompt="a", stream=True), rounds=3, n=2)
    kinds = [(e["type"].removeprefix("image_generation."), e["index"], e.get("partial_image_index")) for e in events]
    assert kinds == [("partial_image", 0, 0), ("partial_image", 1, 0), ("partial_image", 0, 1),
                     ("partial_image", 1, 1), ("completed", 0, None), ("completed", 1, None)]
    assert events[-1]["revised_prompt"] == "A large red cube on grey." and events[-1]["round"] == 3
    assert Image.open(io.BytesIO(base64.b64decode(events[-1]["b64_json"]))).getpixel((0, 0)) == (3, 1, 0)
    assert [e["type"] for e in openai_events(parse(prompt="a", partial_images=1))] == [
        "image_generation.partial_image", "image_generation.completed"]
    assert [e["type"] for e in openai_events(parse(prompt="a", partial_images=0))] == ["image_generation.completed"]


# --- the official openai client against a real local Serve app (tiny model) ----------------------------


@pytest.fixture(scope="module")
def store_env(s3_server):
    """The embedded store's environment, set before Ray starts so that the Serve replicas inherit it."""
    import s3fs

    patch = pytest.MonkeyPatch()
    values = {"AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_ACCESS_KEY_ID": s3_server.access_key,
              "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
              "IRG_BUCKET": s3_server.bucket}
    for name, value in values.items():
        patch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        patch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    patch.undo()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def serve_url(store_env, serve_url):  # conftest's app, started with the store's environment
    return serve_url


@pytest.fixture(scope="module")
def client(serve_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(serve_url):
    import requests

    return requests.get(f"{serve_url}/v1/models", timeout=30).json()["data"][0]["id"]


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.integration
def test_the_openai_client_gets_b64_pngs_revised_prompts_and_the_trajectory(client, model_id):
    response = client.images.generate(model=model_id, prompt="a red cube", n=2, size="64x64",
                                      response_format="b64_json", extra_body=SMALL)
    assert len(response.data) == 2 and response.created > 0
    for item in response.data:
        image = decoded(item.b64_json)
        assert image.format == "PNG" and image.size == (64, 64)
        assert item.revised_prompt and item.revised_prompt.strip()
        assert [r["round"] for r in item.rounds] == [1, 2]
        assert item.rounds[-1]["b64_png"] == item.b64_json and all(r["text"] is not None for r in item.rounds)
    assert response.data[0].b64_json != response.data[1].b64_json  # seeds 7 and 8

    plain = client.images.generate(prompt="a red cube", size="64x64", extra_body=SMALL)  # the first try
    assert decoded(plain.data[0].b64_json).size == (64, 64) and plain.data[0].revised_prompt
    assert client.models.list().data[0].id == model_id  # as the README finds the model's id


@pytest.mark.integration
def test_the_openai_client_gets_a_url_that_downloads_the_png(client, model_id):
    import requests

    response = client.images.generate(model=model_id, prompt="a red cube", size="64x64", response_format="url",
                                      extra_body=SMALL)
    item = response.data[0]
    assert item.b64_json is None and "Expires" in item.url
    download = requests.get(item.url, timeout=30)
    assert download.status_code == 200, download.text[:300]
    image = Image.open(io.BytesIO(download.content))
    assert image.format == "PNG" and image.size == (64, 64)
    assert requests.get(item.rounds[0]["url"], timeout=30).status_code == 200


@pytest.mark.integration
def test_the_openai_client_streams_partial_images_then_the_completed_one(client, model_id):
    stream = client.images.generate(model=model_id, prompt="a red cube", size="64x64", stream=True,
                                    extra_body={**SMALL, "rounds": 3})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert decoded(event.b64_json).size == (64, 64) and event.output_format == "png"
    assert events[-1].revised_prompt


@pytest.mark.integration
def test_the_openai_client_hears_400s_naming_the_field(client, model_id):
    import openai

    cases = [({"model": "dall-e-3"}, "model", "model_not_found"),
             ({"model": model_id, "quality": "ultra"}, "quality", "invalid_value"),
             ({"model": model_id, "extra_body": {"colour": "red"}}, "colour", "unknown_parameter"),
             ({"model": model_id, "size": "72x64", "extra_body": SMALL}, "size", "invalid_value")]
    for kwargs, param, code in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt="a red cube", **kwargs)
        assert (info.value.status_code, info.value.param, info.value.code) == (400, param, code), info.value.body
        assert param in info.value.message
