"""irg.console: library output goes to the log file, the job's own lines to the terminal (no Ray)."""

import logging
import os
import sys
import time
import warnings

import pytest

from irg.console import Bar, Console, Terminal, duration, first_line, library_output_to, step_header


def test_step_header_and_durations():
    assert step_header(2, 6, "IRGL training") == "[2/6] IRGL training"
    assert duration(0) == "0:00"
    assert duration(75.9) == "1:15"
    assert duration(3725) == "1:02:05"


def test_first_line_of_a_multiline_error():
    assert first_line(RuntimeError("\n  worker died\nTraceback (most recent call last):\n ...")) \
        == "RuntimeError: worker died"
    assert first_line(KeyError()) == "KeyError"
    assert len(first_line(ValueError("x" * 1000), limit=50)) == 50


def test_library_output_lands_in_the_file_not_on_the_console(tmp_path, capfd):
    log = tmp_path / "out" / "demo.log"
    library = logging.getLogger("ray.train")
    before = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
              for name in ("", "ray", "DeepSpeed", "mlflow")}
    with library_output_to(log) as terminal:
        console = Console(3, terminal)
        console.step("object store")
        console.say("store: up")
        library.warning("Failed to query Ray Train Controller actor state")
        logging.getLogger("DeepSpeed").info("DeepSpeed info: version=0.19")
        warnings.warn("`foo` is deprecated", FutureWarning, stacklevel=1)
        print("a banner from print()")
        os.write(2, b"a C++ line on fd 2\n")
        sys.stderr.write("a tqdm bar\r")
        console.error("demo: failed at step 1/3: boom")
    captured = capfd.readouterr()
    assert captured.out == "[1/3] object store\n      store: up\n"
    assert captured.err == "demo: failed at step 1/3: boom\n"
    text = log.read_text()
    for noise in ("Failed to query Ray Train Controller", "DeepSpeed info", "FutureWarning: `foo` is deprecated",
                  "a banner from print()", "a C++ line on fd 2", "a tqdm bar"):
        assert noise in text
    assert "store: up" not in text

    # Everything is back as it was: the console and logging work as before.
    print("after")
    assert capfd.readouterr().out == "after\n"
    assert before == {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
                      for name in before}


def test_the_log_file_is_appended_to(tmp_path, capfd):
    log = tmp_path / "demo.log"
    for run in ("first", "second"):
        with library_output_to(log):
            print(f"{run} run")
    assert log.read_text().index("first run") < log.read_text().index("second run")
    assert capfd.readouterr().out == ""


def test_an_error_inside_still_restores_the_terminal(tmp_path, capfd):
    with pytest.raises(ValueError), library_output_to(tmp_path / "demo.log"):
        raise ValueError("inside")
    print("visible")
    assert capfd.readouterr().out == "visible\n"


def test_polled_bars_run_one_after_the_other_and_print_one_line_each_off_a_terminal(capsys):
    counts = {"first": 0}

    def first():
        counts["first"] = min(counts["first"] + 2, 4)
        return counts["first"], f"loss {1 / counts['first']:.2f}"

    console = Console(1)  # capsys: not a terminal, so no redraws, one final line per bar
    with console.progress(Bar("stage 1", 4, poll=first, unit="steps"), Bar("stage 2", 3, poll=lambda: 1),
                          Bar("score", None), interval=0.01):
        deadline = time.monotonic() + 5
        while counts["first"] < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("      stage 1   [########################]  4/4 steps  loss 0.25  0:0")
    assert lines[1].startswith("      stage 2   [########................]  1/3  0:0")
    assert lines[2].startswith("      score     [########################]  0:0")


def test_a_failing_poll_keeps_the_last_count_and_a_failure_marks_the_bar(capsys):
    calls = []

    def poll():
        calls.append(1)
        if len(calls) > 1:
            raise OSError("database is locked")
        return 5

    with pytest.raises(RuntimeError), Console(1).progress(Bar("generate", 10, poll=poll), interval=0.01):
        time.sleep(0.05)
        raise RuntimeError("training failed")
    (line,) = capsys.readouterr().out.splitlines()
    assert " 5/10" in line and line.endswith("(stopped)")


def test_console_writes_to_the_given_terminal(tmp_path):
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        console = Console(2, Terminal(out, err))
        console.step("one")
        console.step("two")
        console.say("a\nb")
        console.say("title", indent=False)
    assert (tmp_path / "out").read_text() == "[1/2] one\n[2/2] two\n      a\n      b\ntitle\n"


def test_a_poll_can_say_when_the_bar_is_done(capsys):
    state = {"finished": False}  # the count is at its total at once (a resumed stage), the work is not
    with Console(1).progress(Bar("stage 2", 30, poll=lambda: (30, "saving", state["finished"])),
                             Bar("after", 1, poll=lambda: 1), interval=0.01) as progress:
        time.sleep(0.1)
        assert progress.current == 0
        state["finished"] = True
        deadline = time.monotonic() + 5
        while progress.current == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "30/30  saving" in lines[0]
