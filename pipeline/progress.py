"""One progress channel for long work (TVM tuning, any slow compile): code that works long calls
`report(...)`; whoever runs it decides where the line goes (the CLI's stderr, or from a worker
process over its socket to the caller). `ticking` and `throttled` keep a long stage from being a
silent stretch without flooding a CI log: at most one line every TICK_S seconds from each."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

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
