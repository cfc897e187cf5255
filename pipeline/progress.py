"""One progress channel for long work (TVM tuning, any slow compile): code that works long calls
`report(...)`; whoever runs it decides where the line goes (the CLI's stderr, or from a worker
process over its socket to the caller). `ticking` and `throttled` keep a long stage from being a
silent stretch without flooding a CI log: at most one line every TICK_S seconds from each."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

TICK_S = 10.0

_sink: Callable[[str], None] | None = None


def report(message: str) -> None:
    if _sink is not None:
        _sink(message)


@contextlib.contextmanager
def to(sink: Callable[[str], None] | None) -> Iterator[None]:
    """Progress reported inside the block goes to `sink`."""
    global _sink
    before, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = before


@contextlib.contextmanager
def ticking(say: Callable[[str], None] | None, what: str, every_s: float | None = None) -> Iterator[None]:
    """While the block runs, `say` hears "<what> (Ns so far)" every `every_s` seconds, from a thread:
    a compile or an export that reports nothing of its own still shows that it is at work."""
    if say is None:
        yield
        return
    stop, t0, every = threading.Event(), time.monotonic(), every_s or TICK_S

    def beat() -> None:
        while not stop.wait(every):
            say(f"{what} ({time.monotonic() - t0:.0f}s so far)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def throttled(say: Callable[[str], None], every_s: float | None = None) -> Callable[[str, bool], None]:
    """`say`, passing a message on only when `every_s` seconds have gone by since the last one it
    passed (or when told it is the last)."""
    last, every = [time.monotonic()], TICK_S if every_s is None else every_s

    def maybe(message: str, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - last[0] >= every:
            last[0] = now
            say(message)

    return maybe


# The two displays the CLI shows progress on.

class Lines:
    """Progress as plain lines on stderr, each with the seconds since the command started: what CI logs keep."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class Bar(Lines):
    """Progress on a terminal: every line kept above a live `rich` bar that shows the latest one,
    the time since the start and, while a backend autotunes, its trials measured of those planned."""

    _TRIALS = re.compile(r"(\d+)/(\d+) trials measured")

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        super().__init__()
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console or Console(stderr=True), transient=True)
        self.task = self.bar.add_task("starting", total=None)
        self.bar.start()

    def __call__(self, msg: str) -> None:
        self.bar.console.print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", markup=False, highlight=False)
        trials = self._TRIALS.search(msg)
        short = msg if len(msg) <= 60 else msg[:57] + "..."
        if trials:
            self.bar.update(self.task, description=short, completed=int(trials[1]), total=int(trials[2]))
        elif self.bar.tasks[0].total is not None:  # no count now: a spinner again (update cannot unset a total)
            self.bar.remove_task(self.task)
            self.task = self.bar.add_task(short, total=None)
        else:
            self.bar.update(self.task, description=short)

    def close(self) -> None:
        self.bar.stop()


_open: list[Lines] = []


def display() -> Lines:
    """A rich bar on a terminal, plain timestamped lines anywhere else (CI logs, pipes)."""
    tty = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    _open.append(Bar() if tty else Lines())
    return _open[-1]


def close_displays() -> None:
    while _open:
        _open.pop().close()


def quiet_libraries() -> None:
    """What libraries print that tells a Kiln user nothing goes to the debug log (KILN_DEBUG=1 shows
    it): Python warnings (torchao's deprecations among them), torch's own log lines and the progress
    bars of transformers and huggingface_hub ("Loading weights"). Set before they are imported, so
    workers inherit it; a user's own settings of these variables win. Errors still print."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_LOGS", "-all")  # every torch logger at ERROR
    logging.captureWarnings(True)
    chatter = logging.getLogger("py.warnings")
    chatter.addHandler(logging.NullHandler())
    chatter.propagate = False
