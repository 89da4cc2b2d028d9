"""``irg generate`` as a user runs it: a subprocess writing PNGs and trace.json."""

import json
import subprocess
import sys

import pytest
from conftest import FIXTURE_DIR
from PIL import Image


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "irg.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_writes_one_png_per_round_and_a_trace(tmp_path):
    out = tmp_path / "out"
    result = run_cli("generate", "--model", str(FIXTURE_DIR), "--prompt", "a red cube", "--out", str(out),
                     "--size", "64", "--steps", "8", "--max-think-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["round1.png", "round2.png", "trace.json"]
    for name in ("round1.png", "round2.png"):
        assert Image.open(out / name).size == (64, 64)
    trace = json.loads((out / "trace.json").read_text())
    assert trace["prompt"] == "a red cube"
    assert trace["settings"]["steps"] == 8 and trace["settings"]["seed"] == 0
    assert len(trace["texts"]) == 2 and all(isinstance(t, str) for t in trace["texts"])
    assert trace["timings_s"]["total_s"] > 0
    assert "step" in result.stderr  # the progress bar


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "50"], "height: must be a positive multiple of 16"),
        (["--steps", "1"], "num_steps"),
        (["--rounds", "0"], "rounds"),
        (["--device", "quantum"], "unknown device"),
        (["--prompt", ""], "prompt"),
    ],
)
def test_bad_arguments_fail_with_a_clear_message(tmp_path, args, message):
    base = {"--model": str(FIXTURE_DIR), "--prompt": "a red cube", "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    result = run_cli("generate", *[x for kv in base.items() for x in kv])
    assert result.returncode == 2
    assert message in result.stderr
    assert "?step/s" not in result.stderr  # rejected before the model was loaded and the bar started
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_is_named(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "llm_config.json" in result.stderr
