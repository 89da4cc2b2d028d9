"""Hostile or broken images in IRGL rows are rejected rows (``bad_image``), never a decoder's traceback."""

import base64
import io
import json
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from irg.data.format import IMAGE_FORMATS, MAX_IMAGE_PIXELS, RowError, decode_image
from irg.data.synth import synth_conversation


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but carries almost no data: a bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")
SMALL = Image.new("RGB", (8, 8), "red")
BAD = {
    "bomb_png": (png_header(20000, 20000), "too large"),
    "over_the_cap_png": (png_header(8000, 8000), f"8000x8000 pixels, more than {MAX_IMAGE_PIXELS}"),
    "eps": (EPS, "not PNG, JPEG, WEBP"),
    "gif": (encoded(SMALL, "GIF"), "not PNG, JPEG, WEBP"),
    "truncated_png": (encoded(SMALL, "PNG")[:-30], "not a readable image (OSError"),
    "random_bytes": (bytes(range(256)) * 4, "not a readable image"),
}


@pytest.mark.parametrize("name", BAD)
def test_each_bad_image_is_a_bad_image_row_error_naming_the_problem(name):
    data, problem = BAD[name]
    with pytest.raises(RowError) as info:
        decode_image(base64.b64encode(data).decode(), "conversation[2].content[1].content")
    assert info.value.kind == "bad_image"
    assert info.value.field == "conversation[2].content[1].content"
    assert problem in info.value.reason
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_the_accepted_formats_still_decode_to_rgb(fmt):
    image = decode_image(base64.b64encode(encoded(SMALL, fmt)).decode(), "x")
    assert image.mode == "RGB" and image.size == (8, 8)


def test_the_registry_decodes_images_with_the_same_guard():
    from irg import registry

    assert registry.decode_image(base64.b64encode(encoded(SMALL, "PNG")).decode()).size == (8, 8)
    with pytest.raises(ValueError, match="not PNG, JPEG, WEBP"):
        registry.decode_image(base64.b64encode(encoded(SMALL, "GIF")).decode())


def test_data_import_rejects_the_bomb_row_by_name(tmp_path, capsys):
    from irg.cli import main

    good = synth_conversation("initial_full_learning", 0, 0, image_size=32)
    bomb = json.loads(good)
    bomb[2]["content"][1]["content"] = base64.b64encode(png_header(20000, 20000)).decode()
    src = tmp_path / "src" / "initial_full_learning"
    src.mkdir(parents=True)
    pq.write_table(pa.table({"conversation": pa.array([good, json.dumps(bomb)], pa.string())}),
                   src / "part-0.parquet")

    assert main(["data", "import", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    out = capsys.readouterr().out
    assert "initial_full_learning/part-0.parquet row group 0 row 1: conversation[2].content[1].content" in out
    assert "too large" in out
    rows = pq.read_table(tmp_path / "dst" / "initial_full_learning").column("conversation").to_pylist()
    assert rows == [good]
