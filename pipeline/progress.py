"""One progress channel for long work (TVM tuning, any slow compile): code that works long calls
`report(...)`; whoever runs it decides where the line goes (the CLI's stderr, or from a worker
process over its socket to the caller)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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
