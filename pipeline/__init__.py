"""Kiln: capture a Transformer once, compile it through several backends, prove equivalence, measure speed.

    import pipeline as kiln
    bundle = kiln.load_model("tiny-bert")
    captured = kiln.capture(bundle)
    print(kiln.list_backends())                  # {name: 'available' | 'unavailable: <reason>'}
    engine = kiln.compile(captured, name, "fp32")  # one of those names
    ...
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

import backends as registry

# The API's names, each imported from its module on first use: `import pipeline` (and so every
# `kiln` command, whose code lives here) does not load torch until something needs it.
_LAZY = {
    "bench": ("Speedup", "Timing", "benchmark", "speedup"), "build": ("build", "run"), "capture": ("Captured", "capture"),
    "compare": ("Comparison", "Tolerance", "compare"),
    "errors": ("ArtifactError", "BackendError", "InputError", "KilnError", "NumericsError", "ShapeError", "UnknownChoiceError"),
    "inputs": ("Shape", "make_inputs"), "models": ("ModelBundle", "load_model"), "precision": ("Precision",),
    "references": ("References",), "report": ("Report", "Result"), "store": ("load", "verify", "GenerationArtifact", "load_generation", "verify_generation"), "predict": ("Predictor",),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:
    from .bench import Speedup, Timing, benchmark, speedup
    from .build import build, run
    from .capture import Captured, capture
    from .compare import Comparison, Tolerance, compare
    from .errors import ArtifactError, BackendError, InputError, KilnError, NumericsError, ShapeError, UnknownChoiceError
    from .inputs import Shape, make_inputs
    from .models import ModelBundle, load_model
    from .precision import Precision
    from .predict import Predictor
    from .references import References
    from .report import Report, Result
    from .store import GenerationArtifact, load, load_generation, verify, verify_generation


class _Api(types.ModuleType):
    """`pipeline.build`, `.capture` and `.compare` are the API's functions, as they were when this
    file imported them eagerly: loading the submodule of the same name does not replace them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOME and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Api


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def predictor(artifact: str, device: str | None = None) -> Predictor:
    """A built artifact that answers text: `kiln.predictor(dir).predict(["a sentence"])`."""
    from .predict import Predictor

    return Predictor.load(artifact, device)


def list_backends(device: str = "cpu") -> dict[str, str]:
    """{name: 'available' | 'unavailable: <reason>'}."""
    return {n: str(registry.get(n).availability(device)) for n in registry.names()}


def compile(captured: Captured, backend: str, precision: str | Precision = "fp32", device: str = "cpu",
            options: dict[str, Any] | None = None) -> Any:
    """One engine from the captured program: a CompiledModel (named tensors in, named tensors out)."""
    from .precision import Precision

    return registry.get(backend).compile(captured, Precision.parse(precision), device, options)


__all__ = ["ArtifactError", "BackendError", "Captured", "Comparison", "GenerationArtifact", "load_generation", "verify_generation", "InputError", "KilnError", "ModelBundle", "NumericsError",
           "Precision", "Predictor", "References", "Report", "Result", "Shape", "ShapeError", "Speedup", "Timing", "Tolerance", "UnknownChoiceError", "benchmark",
           "build", "capture", "compare", "compile", "list_backends", "load", "load_model", "make_inputs", "predictor", "run", "speedup",
           "verify"]
