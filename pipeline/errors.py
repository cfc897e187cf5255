"""One exception hierarchy. A KilnError is a user-facing error: the CLI prints it without a traceback."""

from __future__ import annotations

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


class GenerationUnsupported(BackendError):
    """This backend (or precision) does not run generation (yet): a row that says so, never a failure."""


class NumericsError(KilnError):
    """Outputs that are not finite (NaN or Inf)."""


class ArtifactError(KilnError):
    """An artifact that is missing, corrupted, tampered with, or from another tool or version."""
