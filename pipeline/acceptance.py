"""What ships is what was checked and timed: a build's saved engine is loaded back from its files
(in a fresh worker process that has none of the model's code), compared with eager at every built
shape on every input kind, and timed against eager in interleaved rounds. Those verdicts and
numbers, not the in-memory engine's, go into the manifest; any shape that fails keeps the engine out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import store
from .bench import Speedup, Timing, benchmark, speedup
from .compare import Comparison
from .inputs import Shape
from .manifest import Verdict
from .precision import Precision, Tolerance
from .references import References
from .worker import RemoteEngine


@dataclass
class ShapeCheck:
    shape: Shape
    comparison: Comparison
    reference: Timing | None = None
    engine: Timing | None = None

    @property
    def speedup(self) -> Speedup | None:
        return speedup(self.reference, self.engine) if self.reference and self.engine else None


@dataclass
class Acceptance:
    engine: str  # which engine was checked: its saved files, loaded back
    shapes: list[ShapeCheck]

    @property
    def passed(self) -> bool:
        return bool(self.shapes) and all(s.comparison.passed for s in self.shapes)

    @property
    def reason(self) -> str:
        failing = [s for s in self.shapes if not s.comparison.passed]
        if failing:
            return "; ".join(f"at {s.shape}: {s.comparison.reason}" for s in failing)
        return "; ".join(f"at {s.shape}: {s.comparison.reason}" for s in self.shapes[:1])

    def manifest(self, axes: Mapping[str, list[int | str]]) -> dict[str, Any]:
        """The verdict, per-shape tolerances and speed of the loaded engine, for the manifest."""
        first = self.shapes[0].comparison.outputs
        return {
            "outputs": {o.name: {"dims": list(axes[o.name]), "dtype": o.dtype} for o in first},
            "verdict": Verdict("pass" if self.passed else "mismatch", self.reason, self.engine,
                               max((o.max_abs for s in self.shapes for o in s.comparison.outputs), default=0.0),
                               shapes={str(s.shape): {"verdict": "pass" if s.comparison.passed else "fail", "reason": s.comparison.reason,
                                                      "batches": s.comparison.batches,
                                                      "tolerances": {o.name: o.applied.to_dict() for o in s.comparison.outputs}}
                                       for s in self.shapes}),
            "benchmark": {str(s.shape): {"median_ms": s.engine.median if s.engine else None,
                                         "reference_median_ms": s.reference.median if s.reference else None,
                                         "speedup": sp.value if (sp := s.speedup) else None,
                                         "speedup_ci": [sp.ci_low, sp.ci_high] if sp else None} for s in self.shapes},
        }


def accept(directory: Path, refs: References, precision: Precision, device: str, reference: Any, *,
           cls_path: tuple[str, str] | None, isolated: bool, warmup: int, rounds: int,
           tolerances: Tolerance | Mapping[str, Tolerance] | None, timeout_s: float,
           say: Callable[[str], None] = lambda _m: None) -> Acceptance:
    """Load the engine saved in `directory` and check and time it at every shape of `refs`."""
    engine: Any = (RemoteEngine.load(f"loaded {directory.name}", directory, device, cls_path, timeout_s) if isolated
                   else store.load(directory, device, allow_failed=True))
    try:
        label = str(engine.describe().get("engine", f"saved engine loaded from {directory.name}/"))
        checks = [ShapeCheck(s, refs.judge(engine, [s], precision, tolerances)) for s in refs.shapes]
        if all(c.comparison.passed for c in checks):  # a failing engine ships nowhere; timing it tells nobody anything
            for c in checks:
                say(f"timing the loaded {directory.name} against eager at {c.shape}")
                inputs = {k: v.to(device) for k, v in refs.batches[c.shape][0].items()}
                def rounds_done(message: str, shape: Shape = c.shape) -> None:
                    say(f"timing the loaded {directory.name} at {shape}: {message}")

                t = benchmark({"reference": (reference, inputs), "engine": (engine, inputs)}, warmup=warmup, rounds=rounds,
                              progress=rounds_done)
                c.reference, c.engine = t["reference"], t["engine"]
        return Acceptance(label, checks)
    finally:
        if isinstance(engine, RemoteEngine):
            engine.close()
