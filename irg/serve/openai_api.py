"""OpenAI Images API compatibility of ``POST /v1/images/generations``: the request body, its errors,
the response and the stream, in OpenAI's shapes, so that the official ``openai`` client works as is.

A body takes OpenAI's fields (``model``, ``prompt``, ``n``, ``size``, ``response_format``,
``output_format``, ``output_compression``, ``quality``, ``style``, ``background``, ``user``,
``safety_identifier``, ``stream``, ``partial_images``) and IRG's own, which the client sends through
``extra_body`` (``steps``, ``rounds``, ``seed``, ``max_think_tokens``, ``cfg_text_scale``,
``cfg_img_scale``, ``step_cache``: the fields of :class:`irg.serve.api.GenerationBody`, so a native body is a valid
one too). ``quality``, ``style``, ``user`` and ``safety_identifier`` take the values OpenAI allows
and do not change the generation (steps and rounds set the effort); ``background`` takes ``auto`` or
``opaque``. A field that cannot be honoured (an unknown one, a value outside OpenAI's set or IRG's
limits, a ``model`` that is not the served one) is a 400 in OpenAI's error shape naming it
(:class:`OpenAIError`).

The response (:func:`openai_response`) is OpenAI's: ``created`` and per image ``b64_json`` (or
``url``) of the final round and ``revised_prompt`` (the final reflection's "Final Comprehensive
Prompt", or the think when there is one round, :func:`revised_prompt`), and, as extra fields the
client keeps (``item.rounds`` or ``item.model_extra["rounds"]``), IRG's ``seed`` and the whole
trajectory ``rounds``: each round's think or reflection ``text`` with its image (``b64_png``, or
``url``). ``response_format="url"`` stores the images on the object store and returns presigned URLs
(:class:`ImageStore`). ``stream: true`` follows OpenAI's image streaming events
(:class:`OpenAIStream`): the earlier rounds' images are the partial images, the last round's is the
completed one; the native stream with every think and step stays on ``/v1/images/generations/stream``.
No Ray here.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import uuid
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from irg import storage
from irg.pipeline import LIMITS
from irg.serve.api import GenerationBody, sse

# Fields OpenAI's client may send that IRG cannot honour in any value (video frames, SVG, moderation).
UNSUPPORTED = ("complexity", "frame_count", "frame_duration_ms", "svg", "moderation")
QUALITIES = ("auto", "standard", "hd", "low", "medium", "high", "xhigh", "max")
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# A pipeline argument named by an InvalidRequestError -> the body field a client set.
_PARAMS = {"height": "size", "width": "size", "num_steps": "steps", "rounds": "rounds", "seed": "seed",
           "max_think_tokens": "max_think_tokens", "prompt": "prompt"}
DEFAULT_URL_EXPIRY_S = 3600


class OpenAIError(Exception):
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, plus the
    ``detail`` (the message) every other IRG endpoint answers with; ``headers`` go with the response
    (``WWW-Authenticate`` with a 401, ``Retry-After`` with a 429 or 503)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
                "detail": self.message}


class OpenAIImageBody(GenerationBody):
    """OpenAI's image generation fields over IRG's own (:class:`GenerationBody`)."""

    model: str | None = None  # must name the served model (GET /v1/models); None: the served one
    response_format: Literal["b64_json", "url"] | None = None  # None: b64_json
    output_format: Literal["png", "jpeg", "webp"] | None = None  # None: png
    output_compression: int | None = Field(None, ge=0, le=100)  # jpeg and webp quality
    quality: Literal[QUALITIES] | None = None  # accepted; does not change the generation
    style: Literal["vivid", "natural"] | None = None  # accepted; does not change the generation
    background: Literal["auto", "opaque"] | None = None  # IRG draws opaque images
    user: str | None = None  # accepted, not stored
    safety_identifier: str | None = None  # accepted, not stored
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=LIMITS.max_rounds - 1)  # None: every earlier round

    @field_validator("size", mode="before")
    @classmethod
    def _auto_size(cls, value):
        return None if value == "auto" else value

    def native(self) -> dict:
        """The native body (:class:`GenerationBody`) the generator takes."""
        return self.model_dump(include=set(GenerationBody.model_fields))

    @property
    def image_format(self) -> str:
        return self.output_format or "png"


def parse_body(raw: bytes, served_model: str) -> OpenAIImageBody:
    """The body of a request, or an :class:`OpenAIError` naming the first field that cannot be honoured."""
    try:
        values = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise OpenAIError(f"the body is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise OpenAIError(f"the body must be a JSON object, got {type(values).__name__}")
    for name in UNSUPPORTED:
        if name in values:
            raise OpenAIError(f"{name}: not supported by IRG", param=name, code="unsupported_parameter")
    try:
        body = OpenAIImageBody.model_validate(values)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(p) for p in error["loc"]) or None
        if error["type"] == "extra_forbidden":
            raise OpenAIError(f"{param}: unknown parameter", param=param, code="unknown_parameter") from None
        raise OpenAIError(f"{param}: {error['msg']}", param=param, code="invalid_value") from None
    if body.model is not None and body.model != served_model:
        raise OpenAIError(f"model: {body.model!r} is not served here; this server serves {served_model!r}",
                          param="model", code="model_not_found")
    if body.stream and body.response_format == "url":
        raise OpenAIError("response_format: a stream sends its images as b64_json; url needs stream false",
                          param="response_format", code="invalid_value")
    return body


def generation_error(message: str) -> OpenAIError:
    """The 400 for the generator's refusal of a request (``InvalidRequestError``: ``"name: why"``)."""
    name = re.split(r"[:\[ ]", message, maxsplit=1)[0]
    param = _PARAMS.get(name, "cfg_text_scale" if name == "round_settings" else None)
    if param is not None and param != name:  # "size: width: ...", the field the client set first
        message = f"{param}: {message}"
    return OpenAIError(message, param=param, code="invalid_value")


# --- the response ---------------------------------------------------------------------------------

_FINAL_PROMPT = re.compile(r"#*\s*Final Comprehensive Prompt[^\n:]*:", re.IGNORECASE)
_THINK_TAGS = re.compile(r"</?think>")


def _clean(text: str) -> str:
    return _THINK_TAGS.sub(" ", text or "").strip()


def revised_prompt(texts: list[str], prompt: str = "") -> str:
    """What the final image was drawn from: the last reflection's "Final Comprehensive Prompt" section,
    else the last text (the think when there is one round), else the last non-empty earlier one, else
    the prompt itself; think tags removed."""
    if len(texts) > 1:
        found = list(_FINAL_PROMPT.finditer(texts[-1]))
        if found and _clean(texts[-1][found[-1].end():]):
            return _clean(texts[-1][found[-1].end():])
    for text in reversed(texts):
        if _clean(text):
            return _clean(text)
    return prompt


def encode_image(b64_png: str, output_format: str = "png", compression: int | None = None) -> bytes:
    """A PNG (base64, as the generator gives it) in ``output_format``; ``compression`` is the jpeg and
    webp quality (0-100, None: the encoder's default)."""
    data = base64.b64decode(b64_png)
    if output_format == "png":
        return data
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    options = {} if compression is None else {"quality": compression}
    image.save(out, format=_PIL_FORMATS[output_format], **options)
    return out.getvalue()


@dataclasses.dataclass
class ImageStore:
    """Where ``response_format="url"`` images go (an ``s3://`` prefix) and how long their presigned URLs
    last; ``config`` None is the loaded :class:`irg.storage.StoreConfig` (the embedded store's too)."""

    prefix: str
    expiry_s: int = DEFAULT_URL_EXPIRY_S
    config: storage.StoreConfig | None = None

    @classmethod
    def default(cls, prefix: str | None = None, expiry_s: int = DEFAULT_URL_EXPIRY_S) -> ImageStore:
        """``prefix``, or ``serve/images`` in the configured store's bucket."""
        if prefix is None:
            config = storage.StoreConfig.load()
            return cls(config.uri("serve", "images"), expiry_s, config)
        return cls(prefix, expiry_s)

    def put(self, data: bytes, name: str) -> str:
        """Writes ``data`` as ``prefix/name`` and returns a presigned URL to download it."""
        uri = storage.join(self.prefix, name)
        with storage.open_file(uri, "wb", self.config) as f:
            f.write(data)
        fs, path = storage.filesystem(uri, self.config)
        return fs.sign(path, expiration=self.expiry_s)


def openai_response(native: dict, body: OpenAIImageBody, store: ImageStore | None = None) -> dict:
    """OpenAI's response for the generator's (:func:`irg.serve.api.response_body`). With
    ``response_format="url"`` every round's image is written to ``store`` (I/O: call it off the event
    loop) and the items carry URLs instead of base64."""
    fmt = body.image_format
    use_url = body.response_format == "url"
    if use_url and store is None:
        raise OpenAIError("response_format: url needs an object store, and none is configured",
                          param="response_format", code="unsupported_value")
    folder = f"{native['created']}-{uuid.uuid4().hex}"
    data = []
    for i, item in enumerate(native["data"]):
        rounds = []
        for entry in item["rounds"]:
            if use_url:
                image = encode_image(entry["b64_png"], fmt, body.output_compression)
                url = store.put(image, f"{folder}/{i}-round{entry['round']}.{fmt}")
                rounds.append({"round": entry["round"], "text": entry["text"], "url": url})
            else:
                rounds.append(entry)
        if use_url:
            final = {"url": rounds[-1]["url"]}
        else:
            image = encode_image(item["rounds"][-1]["b64_png"], fmt, body.output_compression)
            final = {"b64_json": base64.b64encode(image).decode()}
        data.append({**final, "revised_prompt": revised_prompt([r["text"] for r in rounds], body.prompt),
                     "seed": item["seed"], "rounds": rounds})
    response = {"created": native["created"], "model": native["model"], "data": data, "output_format": fmt,
                "background": "opaque"}
    if data:
        width, height = (int(v) for v in _size_of(native["data"][0]["rounds"][-1]["b64_png"]))
        response["size"] = f"{width}x{height}"
    return response


def _size_of(b64_png: str) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64_png))).size


# --- the stream -----------------------------------------------------------------------------------


class OpenAIStream:
    """Turns the native stream's (event, data) pairs (:func:`irg.serve.api.event_payload`) into OpenAI's
    image streaming events: ``image_generation.partial_image`` (``partial_image_index`` from 0 per image)
    for the earlier rounds' images, at most ``partial_images`` of them, then
    ``image_generation.completed`` for the last round's. Each event also carries IRG's ``index`` (which
    of the ``n`` images), ``round`` and that round's ``text``; the completed one its ``revised_prompt``."""

    def __init__(self, body: OpenAIImageBody, rounds: int, created: int):
        self.body, self.rounds, self.created = body, rounds, created
        self.texts: dict[int, list[str]] = {}
        self.partials: dict[int, int] = {}

    def _common(self, data: dict, b64_png: str) -> dict:
        image = encode_image(b64_png, self.body.image_format, self.body.output_compression)
        width, height = _size_of(b64_png)
        return {"b64_json": base64.b64encode(image).decode(), "created_at": self.created,
                "size": f"{width}x{height}", "quality": self.body.quality if self.body.quality in (
                    "low", "medium", "high", "auto") else "auto", "background": "opaque",
                "output_format": self.body.image_format, "index": data["index"], "round": data["round"]}

    def event(self, name: str, data: dict) -> list[str]:
        """The OpenAI events (server-sent, as text) for one native event; none for most."""
        if name == "think":
            self.texts.setdefault(data["index"], []).append(data["text"])
            return []
        if name == "restart":  # the request starts over alone: its texts so far are void, partial images stay
            self.texts.clear()
            return []
        if name == "error":
            return [sse("error", OpenAIError(data.get("detail", "generation failed"), status=500,
                                             type="server_error").body())]
        if name != "image":
            return []
        index = data["index"]
        texts = self.texts.get(index, [])
        text = texts[-1] if texts else ""
        if data["round"] < self.rounds:
            done = self.partials.get(index, 0)
            if self.body.partial_images is not None and done >= self.body.partial_images:
                return []
            self.partials[index] = done + 1
            payload = {"type": "image_generation.partial_image", **self._common(data, data["b64_png"]),
                       "partial_image_index": done, "text": text}
            return [sse(payload["type"], payload)]
        payload = {"type": "image_generation.completed", **self._common(data, data["b64_png"]), "text": text,
                   "revised_prompt": revised_prompt(texts, self.body.prompt)}
        return [sse(payload["type"], payload)]
