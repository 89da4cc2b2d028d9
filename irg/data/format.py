"""The IRGL row format: one parquet folder per learning mode, a ``conversation`` JSON column per row.

A conversation is a list of turns. ``{"role": "user", "content": str, "need_loss": bool}`` holds a
plain text span (the system prompt is given as a first user turn); ``{"role": "assistant",
"content": [part, ...]}`` holds text parts ``{"type": "text", "content": str, "need_loss": bool}``
and image parts ``{"type": "image", "content": base64 PNG/JPEG/WebP, "need_loss": bool, "need_vae": bool,
"need_vit": bool}``: ``need_loss`` marks a generation target, ``need_vae``/``need_vit`` the clean
conditioning copies. Parsing is strict: every problem is reported with the field that has it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

IRGL_MODES = (
    "initial_thinking_understanding_learning",
    "initial_thinking_generation_learning",
    "initial_full_learning",
    "improving_thinking_understanding_learning",
    "improving_thinking_generation_learning",
    "improving_full_learning",
)
"""The paper's six learning modes."""
EDITING_MODE = "image_editing_learning"
"""Pretraining's editing task (BAGEL's interleaved data): a source image (clean VAE then ViT tokens) and an
instruction in, the edited image out. IRG's round 2 is an edit of round 1, so a base model that can edit
gives the IRGL round-2 rows an ability to fine-tune rather than one to learn from nothing."""
MODES = (*IRGL_MODES, EDITING_MODE)
FULL_MODES = ("initial_full_learning", "improving_full_learning")
STAGE_WEIGHTS = {
    1: {mode: (1.0 if mode in FULL_MODES else 0.5) for mode in IRGL_MODES},
    2: {mode: 1.0 for mode in FULL_MODES},
}
"""IRGL stage 1 trains all six modes (full modes at weight 1.0, thinking modes 0.5); stage 2 only the full modes.
Editing is not an IRGL mode: a configuration gives it a weight where it wants it (the shapes recipe does)."""

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
"""The only formats a row's image is opened as: Pillow knows dozens more, some of them handed to outside
programs (EPS to Ghostscript), and rows come from anyone."""
MAX_IMAGE_PIXELS = 40_000_000
"""Decompression-bomb guard, checked on the header's size before any pixel is decoded: 40 megapixels
(120 MB as RGB) is far above any training image."""


class RowError(ValueError):
    """A row that does not follow the IRGL format; ``field`` says where (e.g. ``conversation[2].content[1]``)
    and ``kind`` what sort of problem it is (``malformed_json``, ``bad_image`` or ``invalid_format``)."""

    def __init__(self, field: str, reason: str, kind: str = "invalid_format"):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.kind = field, reason, kind


@dataclass(frozen=True)
class TextPart:
    text: str
    loss: bool


@dataclass(frozen=True)
class ImagePart:
    image: Image.Image  # RGB
    loss: bool  # generation target
    vae: bool  # clean VAE copy as condition
    vit: bool  # ViT copy as condition


Part = TextPart | ImagePart


def parse_conversation(raw: str | bytes) -> list[Part]:
    """Parse and validate one ``conversation`` value into an ordered list of parts."""
    try:
        turns = json.loads(raw)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise RowError("conversation", f"not valid JSON ({e})", "malformed_json") from None
    if not isinstance(turns, list) or not turns:
        raise RowError("conversation", "must be a non-empty JSON list of turns")
    parts: list[Part] = []
    for i, turn in enumerate(turns):
        where = f"conversation[{i}]"
        if not isinstance(turn, dict):
            raise RowError(where, "a turn must be an object")
        role, content = turn.get("role"), turn.get("content")
        if role == "user":
            if not isinstance(content, str) or not content:
                raise RowError(f"{where}.content", "a user turn needs non-empty text content")
            parts.append(TextPart(content, _flag(turn, "need_loss", False, where)))
        elif role == "assistant":
            if not isinstance(content, list) or not content:
                raise RowError(f"{where}.content", "an assistant turn needs a non-empty list of parts")
            parts.extend(_parse_part(part, f"{where}.content[{j}]") for j, part in enumerate(content))
        else:
            raise RowError(f"{where}.role", f"must be 'user' or 'assistant', got {role!r}")
    if not any(p.loss for p in parts):
        raise RowError("conversation", "no part has need_loss: the row teaches nothing")
    return parts


def _parse_part(part, where: str) -> Part:
    if not isinstance(part, dict):
        raise RowError(where, "a part must be an object")
    kind, content = part.get("type"), part.get("content")
    if kind == "text":
        if not isinstance(content, str) or not content:
            raise RowError(f"{where}.content", "a text part needs non-empty text")
        return TextPart(content, _flag(part, "need_loss", True, where))
    if kind == "image":
        flags = {name: _flag(part, f"need_{name}", False, where) for name in ("loss", "vae", "vit")}
        if not any(flags.values()):
            raise RowError(where, "an image part needs need_loss, need_vae or need_vit")
        return ImagePart(decode_image(content, f"{where}.content"), **flags)
    raise RowError(f"{where}.type", f"must be 'text' or 'image', got {kind!r}")


def _flag(obj: dict, name: str, default: bool, where: str) -> bool:
    value = obj.get(name, default)
    if not isinstance(value, bool):
        raise RowError(f"{where}.{name}", f"must be true or false, got {value!r}")
    return value


def decode_image(content, where: str) -> Image.Image:
    """base64 PNG, JPEG or WebP -> RGB PIL image, fully decoded (so a truncated file fails here, not
    later). Every way the bytes can be bad is a ``bad_image`` RowError: a decoder error must reject
    the row, not end the import or the training task."""
    if not isinstance(content, str) or not content:
        raise RowError(where, "an image part needs base64 image content", "bad_image")
    try:
        data = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RowError(where, f"not valid base64 ({e})", "bad_image") from None
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height <= MAX_IMAGE_PIXELS:
                image.load()
                return image.convert("RGB")
    except UnidentifiedImageError:
        raise RowError(where, f"not a readable image (not {', '.join(IMAGE_FORMATS)})", "bad_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RowError(where, f"image too large ({e})", "bad_image") from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, ValueError, SyntaxError, struct.error...
        raise RowError(where, f"not a readable image ({type(e).__name__}: {e})", "bad_image") from None
    raise RowError(where, f"image too large: {width}x{height} pixels, more than {MAX_IMAGE_PIXELS}", "bad_image")


def encode_image(image: Image.Image) -> str:
    """PIL image -> base64 PNG, the way IRGL rows carry images."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def conversation_json(parts: list[tuple[str, Part]]) -> str:
    """Serialise (role, part) pairs into the ``conversation`` value; consecutive assistant parts
    share one assistant turn, each user text is its own turn."""
    turns: list[dict] = []
    for role, part in parts:
        if role == "user":
            if not isinstance(part, TextPart):
                raise ValueError("user turns carry text only")
            turns.append({"role": "user", "content": part.text, "need_loss": part.loss})
            continue
        if not turns or turns[-1]["role"] != "assistant":
            turns.append({"role": "assistant", "content": []})
        if isinstance(part, TextPart):
            turns[-1]["content"].append({"type": "text", "content": part.text, "need_loss": part.loss})
        else:
            turns[-1]["content"].append({"type": "image", "content": encode_image(part.image), "need_loss": part.loss,
                                         "need_vae": part.vae, "need_vit": part.vit})
    return json.dumps(turns, ensure_ascii=False)
