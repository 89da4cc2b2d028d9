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


@pytest.mark.integration
def test_store_and_data_commands_end_to_end(tmp_path):
    """irg store up -> data synth -> data import -> data stats -> store down, as a user would."""
    import os

    from irg.embedded_store import free_port_pairs

    env = dict(os.environ, IRG_HOME=str(tmp_path / "home"))
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "IRG_STORE_CONFIG"):
        env.pop(key, None)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # no user config file may interfere
    port = free_port_pairs(1)[0][0]

    def irg(*args):
        return subprocess.run([sys.executable, "-m", "irg.cli", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    up = irg("store", "up", "--port", str(port))
    try:
        assert up.returncode == 0, up.stderr
        assert "healthy" in up.stdout and f"AWS_ENDPOINT_URL=http://127.0.0.1:{port}" in up.stdout
        assert irg("store", "up", "--port", str(port)).returncode == 0  # idempotent
        synth = irg("data", "synth", "--out", "s3://irg/synth", "--rows", "3", "--image-size", "64")
        assert synth.returncode == 0, synth.stderr
        imported = irg("data", "import", "s3://irg/synth", "s3://irg/clean")
        assert imported.returncode == 0, imported.stderr
        stats = irg("data", "stats", "s3://irg/clean", "--json")
        assert stats.returncode == 0, stats.stderr
        modes = json.loads(stats.stdout)["modes"]
        assert len(modes) == 7 and all(m["rows"] == 3 for m in modes.values())  # the six IRGL modes and editing
        again = irg("data", "import", "s3://irg/synth", "s3://irg/clean")
        assert again.returncode == 2 and "irg data: error:" in again.stderr  # refuses to mix with old data
    finally:
        down = irg("store", "down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert irg("store", "status").returncode == 1
    assert irg("store", "down").returncode == 0  # idempotent


@pytest.mark.parametrize(
    "args, message",
    [
        (["data", "synth", "--out", "OUT", "--rows", "0"], "argument --rows: must be an integer >= 1, got '0'"),
        (["store", "up", "--port", "0"], "S3 port 0 out of range"),
        (["store", "up", "--bucket", "Bad_Name"], "invalid bucket name 'Bad_Name'"),
        (["data", "synth", "--out", "OUT", "--rows", "1", "--image-size", "50"], "image_size must be a multiple of 16"),
    ],
)
def test_user_errors_exit_2_with_one_line_naming_the_problem(tmp_path, monkeypatch, capsys, args, message):
    from irg.cli import main

    monkeypatch.setenv("IRG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IRG_DEBUG", raising=False)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "error:" in err[-1] and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "home" / "store").exists()


def test_irg_debug_keeps_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    from irg.cli import main

    monkeypatch.setenv("IRG_DEBUG", "1")
    with pytest.raises(ValueError, match="image_size"):
        main(["data", "synth", "--out", str(tmp_path / "out"), "--rows", "1", "--image-size", "50"])
