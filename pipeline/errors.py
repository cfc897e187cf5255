"""One exception hierarchy. A KilnError is a user-facing error: the CLI prints it without a traceback."""

from __future__ import annotations

import re
from collections.abc import Iterable


class KilnError(Exception):
    """Base of every error Kiln raises on purpose. The message is written for people."""


class InputError(KilnError):
    """Bad input from the user: unknown name, malformed value, shape outside a built range."""


class UnknownChoiceError(InputError):
    """A name that is not one of the valid choices; the message lists them."""

    def __init__(self, what: str, given: str, choices: Iterable[str]) -> None:
        self.what, self.given, self.choices = what, given, sorted(choices)
        super().__init__(f"unknown {what} {given!r}; valid: {', '.join(self.choices)}")


class ShapeError(InputError):
    """A shape that is malformed or outside the range a model or engine was built for."""


class BackendError(KilnError):
    """A backend failed to compile, load or run."""


class NumericsError(KilnError):
    """Outputs that are not finite (NaN or Inf)."""


class ArtifactError(KilnError):
    """An artifact that is missing, corrupted, tampered with, or from another tool or version."""


_WHERE = re.compile(r"^Exception from \S+:\d+:$")


def short(e: BaseException) -> str:
    """An exception as a row's reason: Kiln's own in full, anything else as its type and first line."""
    if isinstance(e, KilnError):
        return str(e)[:800]
    # native libraries open with the C++ file and line of each rethrow ("Exception from src/...cpp:224:"): not the cause
    text = [line for line in str(e).strip().splitlines() if line.strip() and not _WHERE.match(line.strip())]
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]
