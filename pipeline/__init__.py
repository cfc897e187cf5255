"""Kiln: capture a Transformer once, compile it through several backends, prove equivalence, measure speed.

    import pipeline as kiln
    bundle = kiln.load_model("tiny-bert")
    captured = kiln.capture(bundle)
    print(kiln.list_backends())                  # {name: 'available' | 'unavailable: <reason>'}
    engine = kiln.compile(captured, name, "fp32")  # one of those names
    ...
"""

from __future__ import annotations

from typing import Any

from .bench import Speedup, Timing, benchmark, speedup
from .build import build, run
from .capture import Captured, capture
from .compare import Comparison, Tolerance, compare
from .errors import ArtifactError, BackendError, InputError, KilnError, NumericsError, ShapeError, UnknownChoiceError
from .inputs import Shape, make_inputs
from .models import ModelBundle, load_model
from .precision import Precision
from .references import References
from .report import Report, Result
from .store import load, verify
from .predict import Predictor
from .genbuild import GenerationArtifact, build_generation, load_generation, verify_generation


def predictor(artifact: str, device: str | None = None) -> Predictor:
    """A built artifact that answers text: `kiln.predictor(dir).predict(["a sentence"])`."""
    return Predictor.load(artifact, device)


def list_backends(device: str = "cpu") -> dict[str, str]:
    """{name: 'available' | 'unavailable: <reason>'}."""
    import backends as registry

    return {n: str(registry.get(n).availability(device)) for n in registry.names()}


def compile(captured: Captured, backend: str, precision: str | Precision = "fp32", device: str = "cpu",
            options: dict[str, Any] | None = None) -> Any:
    """One engine from the captured program: a CompiledModel (named tensors in, named tensors out)."""
    import backends as registry

    return registry.get(backend).compile(captured, Precision.parse(precision), device, options)


__all__ = ["ArtifactError", "BackendError", "Captured", "Comparison", "GenerationArtifact", "build_generation", "load_generation", "verify_generation", "InputError", "KilnError", "ModelBundle", "NumericsError",
           "Precision", "Predictor", "References", "Report", "Result", "Shape", "ShapeError", "Speedup", "Timing", "Tolerance", "UnknownChoiceError", "benchmark",
           "build", "capture", "compare", "compile", "list_backends", "load", "load_model", "make_inputs", "predictor", "run", "speedup",
           "verify"]
