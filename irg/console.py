"""The console of a long job: numbered steps, progress bars over polled counters, library noise in a file.

A job that drives Ray, DeepSpeed and MLflow inherits their output (banners, warnings, every worker's
progress bars, C++ log lines); its user should read the job's own steps and results on the terminal
and find the rest in one log file. :func:`library_output_to` points file descriptors 1 and 2 (and
Python logging and warnings) at that file and hands back the real terminal, on which a
:class:`Console` writes. Nothing here imports Ray, so it is cheap to use before the heavy imports.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

# Loggers whose records belong in the log file: libraries that log at INFO or warn on every run.
LIBRARY_LOGGERS = ("ray", "DeepSpeed", "deepspeed", "mlflow", "py.warnings", "torch", "urllib3", "botocore",
                   "s3fs", "fsspec", "filelock", "alembic", "httpx", "asyncio", "matplotlib", "PIL")
INDENT = " " * 6  # under the text of a "[1/6] " header


def step_header(index: int, total: int, title: str) -> str:
    """``[2/6] title``: the same width for every step, so results can be indented under it."""
    return f"[{index}/{total}] {title}"


def duration(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``): elapsed time the way a progress bar shows it."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one line: Ray's errors carry whole remote tracebacks in their message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Terminal:
    """Where the job's own lines go: the stdout and stderr the process had before the redirection."""

    out: TextIO
    err: TextIO


@contextmanager
def library_output_to(path: str | os.PathLike, loggers: tuple[str, ...] = LIBRARY_LOGGERS,
                      level: int = logging.INFO) -> Iterator[Terminal]:
    """Send everything but the job's own lines to ``path`` (appended) until the block ends.

    File descriptors 1 and 2 (and ``sys.stdout``, ``sys.stderr``) are pointed at the file, so ``print``,
    C++ parts that write to stderr and child processes started meanwhile land there too (Ray's driver
    prints the worker logs it is forwarded into it as well). Python
    logging goes to the file through the root logger (the libraries' own console handlers are taken
    off), and warnings are captured as ``py.warnings`` records. Yields the real terminal.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 (closed below)
    file.write(f"\n===== {datetime.now():%Y-%m-%d %H:%M:%S} {' '.join(sys.argv)}\n")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = (os.dup(1), os.dup(2))
    terminal = Terminal(os.fdopen(saved[0], "w", buffering=1, encoding="utf-8", errors="replace"),
                        os.fdopen(saved[1], "w", buffering=1, encoding="utf-8", errors="replace"))
    os.dup2(file.fileno(), 1)
    os.dup2(file.fileno(), 2)

    handler = logging.StreamHandler(file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    restore = [(root, root.level, root.propagate, list(root.handlers))]
    for name in loggers:
        logger = logging.getLogger(name)
        restore.append((logger, logger.level, logger.propagate, list(logger.handlers)))
        for h in list(logger.handlers):
            if _is_console_handler(h):
                logger.removeHandler(h)
        logger.propagate = True
    for h in list(root.handlers):
        if _is_console_handler(h):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    streams = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = file  # also where the Python objects are not fd 1 and 2 (pytest, notebooks)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each warning once per place, in the file
            yield terminal
    finally:
        sys.stdout, sys.stderr = streams
        logging.captureWarnings(False)
        for logger, old_level, propagate, handlers in restore:
            logger.setLevel(old_level)
            logger.propagate = propagate
            logger.handlers = handlers
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        terminal.out.close()
        terminal.err.close()
        file.close()


def _is_console_handler(handler: logging.Handler) -> bool:
    """A handler writing to the process's stdout or stderr (not a file of its own)."""
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    stream = handler.stream
    if stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        return True
    try:
        return stream.fileno() in (1, 2)
    except (AttributeError, OSError, ValueError):
        return False


class Console:
    """The job's voice: numbered step headers, indented results, live progress bars, one-line errors.

    On a terminal a bar redraws in place; elsewhere (a pipe, CI) each bar prints one final line, so a
    log of the console stays short. Safe to call from a bar's polling thread and the main thread.
    """

    def __init__(self, steps: int, terminal: Terminal | None = None):
        self.steps = steps
        self.index = 0
        self.out = terminal.out if terminal else sys.stdout
        self.err = terminal.err if terminal else sys.stderr
        self.live = self.out.isatty()
        self.started = time.monotonic()
        self._lock = threading.RLock()
        self._bar_line: str | None = None  # what is drawn on the current line, if a bar is live

    def step(self, title: str) -> None:
        self.index += 1
        self._write(step_header(self.index, self.steps, title))

    def say(self, text: str = "", indent: bool = True) -> None:
        for line in text.splitlines() or [""]:
            self._write(f"{INDENT}{line}" if indent and line else line)

    def error(self, text: str) -> None:
        with self._lock:
            self._clear_bar()
            self.err.write(text + "\n")
            self.err.flush()

    def elapsed(self) -> str:
        return duration(time.monotonic() - self.started)

    def progress(self, *bars: Bar, interval: float = 2.0) -> Progress:
        """Draw ``bars`` one after the other (the next starts when the one before reaches its total)."""
        return Progress(self, list(bars), interval)

    def _write(self, line: str) -> None:
        with self._lock:
            self._clear_bar()
            self.out.write(line + "\n")
            if self._bar_line is not None:
                self.out.write(self._bar_line)
            self.out.flush()

    def _clear_bar(self) -> None:
        if self._bar_line is not None:
            self.out.write("\r\x1b[K")

    def _draw(self, line: str, final: bool) -> None:
        with self._lock:
            if final:
                self._clear_bar()
                self.out.write(line + "\n")
                self._bar_line = None
            elif self.live:
                self.out.write("\r\x1b[K" + line)
                self._bar_line = line
            self.out.flush()


@dataclass
class Bar:
    """One bar: ``label``, ``total`` and either a ``poll`` read every few seconds or counts pushed with
    :meth:`set`. A poll returns the count done, ``(count, note)`` or ``(count, note, finished)``: the
    flag, when given, decides when the bar is done (a count can reach its total while the work still
    runs, e.g. a stage that has taken its last step and exports its model). ``total=None``: no count."""

    label: str
    total: int | None
    poll: Callable[[], int | tuple] | None = None
    unit: str = ""
    done: int = 0
    note: str = ""
    complete: bool | None = None  # what the poll said, if it says

    def set(self, done: int, note: str | None = None, complete: bool | None = None) -> None:
        self.done = done
        if note is not None:
            self.note = note
        if complete is not None:
            self.complete = complete

    def read(self) -> None:
        """Ask ``poll`` for the count; a failed poll (a busy database, a listing error) keeps the last one."""
        if self.poll is None:
            return
        try:
            value = self.poll()
        except Exception:
            log.debug("progress poll for %s failed", self.label, exc_info=True)
            return
        done, note, complete = (tuple(value) + (None, None))[:3] if isinstance(value, tuple) else (value, None, None)
        self.set(max(self.done, int(done)), note, complete)

    @property
    def finished(self) -> bool:
        if self.complete is not None:
            return self.complete
        return self.total is not None and self.done >= self.total


class Progress:
    """Bars over counters that something else advances (a Ray Train run's MLflow step, files written
    by Ray Data actors): a thread polls and redraws while the main thread blocks in the library call.
    Use as a context manager; on leaving, the bars still open are read once more and closed."""

    WIDTH = 24

    def __init__(self, console: Console, bars: list[Bar], interval: float = 2.0):
        self.console = console
        self.bars = bars
        self.interval = interval
        self.current = 0
        self.bar_started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="irg-progress", daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._stop.set()
        self._thread.join()
        while self.current < len(self.bars):
            bar = self.bars[self.current]
            if error is None:
                bar.read()
            self._finish(bar, failed=error is not None)

    def _run(self) -> None:
        while not self._stop.is_set():
            while self.current < len(self.bars):  # polled outside the console's lock: a poll can be slow
                bar = self.bars[self.current]
                bar.read()
                if not bar.finished or self._stop.is_set():
                    break
                self._finish(bar)
            next_poll = time.monotonic() + self.interval
            while not self._stop.is_set() and time.monotonic() < next_poll and self.current < len(self.bars):
                with self.console._lock:
                    if not self._stop.is_set():
                        bar = self.bars[self.current]
                        self.console._draw(self.render(bar, time.monotonic() - self.bar_started), final=False)
                self._stop.wait(0.5)
            if self.current >= len(self.bars):
                return

    def _finish(self, bar: Bar, failed: bool = False) -> None:
        now = time.monotonic()
        line = self.render(bar, now - self.bar_started, final=True)
        self.console._draw(line + ("  (stopped)" if failed else ""), final=True)
        self.current += 1
        self.bar_started = now

    def render(self, bar: Bar, seconds: float, final: bool = False) -> str:
        """``      stage 1   [#########.......]  12/30 steps  loss 3.07  0:41``"""
        if bar.total:
            filled = round(self.WIDTH * min(bar.done, bar.total) / bar.total)
            cells = "#" * filled + "." * (self.WIDTH - filled)
            count = f"{bar.done:>{len(str(bar.total))}}/{bar.total}{' ' + bar.unit if bar.unit else ''}"
        else:  # no count to show: a moving mark while it runs, full when it is done
            position = int(seconds * 2) % self.WIDTH
            cells = "#" * self.WIDTH if final else "." * position + "#" + "." * (self.WIDTH - position - 1)
            count = bar.unit
        parts = [f"{INDENT}{bar.label:<9} [{cells}]", count, bar.note, duration(seconds)]
        return "  ".join(p for p in parts if p)
