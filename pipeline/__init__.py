"""Kiln: capture a Transformer once, compile it through several backends, prove equivalence, measure speed.

    import pipeline as kiln
    bundle = kiln.load_model("tiny-bert")
    captured = kiln.capture(bundle)
    engine = kiln.compile(captured, "onnxruntime", "fp32")
    ...
"""

from __future__ import annotations

from typing import Any

from .artifacts import build, load, verify
from .bench import Timing, benchmark, speedup
from .capture import Captured, capture
from .compare import Comparison, Tolerance, compare
from .errors import ArtifactError, BackendError, InputError, KilnError, NumericsError, ShapeError, UnknownChoiceError
from .inputs import Shape, make_inputs
from .models import ModelBundle, load_model
from .precision import Precision
from .report import Report, Result
from .runner import run


def list_backends(device: str = "cpu") -> dict[str, str]:
    """{name: 'available' | 'unavailable: <reason>'}."""
    import backends as registry

    return {n: str(registry.get(n).availability(device)) for n in registry.names()}


def compile(captured: Captured, backend: str, precision: str | Precision = "fp32", device: str = "cpu",
            options: dict[str, Any] | None = None) -> Any:
    """One engine from the captured program: a CompiledModel (named tensors in, named tensors out)."""
    import backends as registry

    return registry.get(backend).compile(captured, Precision.parse(precision), device, options)


__all__ = ["ArtifactError", "BackendError", "Captured", "Comparison", "InputError", "KilnError", "ModelBundle", "NumericsError",
           "Precision", "Report", "Result", "Shape", "ShapeError", "Timing", "Tolerance", "UnknownChoiceError", "benchmark",
           "build", "capture", "compare", "compile", "list_backends", "load", "load_model", "make_inputs", "run", "speedup",
           "verify"]
