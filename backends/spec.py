"""The records every engine carries, whatever compiled it: its EngineSpec (what a loader needs
besides the backend's files, kept in the manifest) and its ServingFormat (how Triton serves it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.calibration import FILE as CALIBRATION_FILE, Calibration, QuantSpec
from pipeline.errors import ArtifactError
from pipeline.models import InputSpec
from pipeline.precision import Precision

from .options import BackendOptions


@dataclass(frozen=True)
class EngineSpec:
    """What every engine is, whatever compiled it: the facts a loader needs besides the backend's files."""

    backend: str
    precision: Precision
    device: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    options: BackendOptions
    # What the engine's door admits: each input's dtype, dims and value bound, and the axis ranges.
    input_specs: Mapping[str, InputSpec] = dataclasses.field(default_factory=dict)
    axis_ranges: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    requires: Mapping[str, str] = dataclasses.field(default_factory=dict)  # Backend.pinned() where it was built
    # int8: how it was quantized; a static int8 engine carries its calibration (calibration.json).
    quant: QuantSpec | None = None
    calibration: Calibration | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"inputs": list(self.input_names), "outputs": list(self.output_names), "options": self.options.to_dict(),
               "input_specs": {n: s.to_dict() for n, s in self.input_specs.items()},
               "axis_ranges": {k: list(v) for k, v in self.axis_ranges.items()}}
        if self.quant is not None:
            out["quantization"] = self.quantization()
        return out

    def quantization(self) -> dict[str, Any]:
        """An int8 engine's settings as data (the QuantSpec, and its calibration where it has one)."""
        if self.quant is None:
            return {}
        out: dict[str, Any] = {**self.quant.to_dict(), "activations": "static" if self.precision == Precision.INT8 else "dynamic"}
        if self.calibration is not None:
            out.update(calibration=CALIBRATION_FILE, calibration_digest=self.calibration.digest, rows=self.calibration.rows,
                       layers=len(self.calibration.layers))
        return out

    @property
    def quantization_text(self) -> str:
        """The quantization in words, for reports and `kiln load`."""
        if self.quant is None:
            return ""
        weights = "int8 per channel" if self.quant.per_channel else "int8 per tensor"
        if self.precision != Precision.INT8:
            return f"weights {weights}, activations int8, quantized at run time"
        how = "calibrated" if self.calibration else f"estimated by {self.backend}'s quantizer"
        return f"weights {weights}, activations int8, ranges {how} ({self.quant.method}, {self.quant.samples} samples)"

    @classmethod
    def from_dict(cls, backend: str, precision: Precision, device: str, engine: Mapping[str, Any],
                  options_type: type[BackendOptions], requires: Mapping[str, str],
                  calibration: Calibration | None = None) -> EngineSpec:
        """The spec a manifest's engine section describes (`to_dict`'s inverse); the calibration is the engine's own file."""
        names, specs = tuple(engine["inputs"]), engine.get("input_specs")
        if not isinstance(specs, dict) or set(specs) != set(names):
            raise ArtifactError(f"the manifest's engine.input_specs does not describe every input ({', '.join(names)}): "
                                f"the engine's door would not check them; rebuild it")
        quant = engine.get("quantization")
        return cls(backend, precision, device, names, tuple(engine["outputs"]), options_type.from_mapping(engine.get("options", {})),
                   {n: InputSpec.from_dict(s) for n, s in specs.items()},
                   {k: (int(v[0]), int(v[1])) for k, v in engine.get("axis_ranges", {}).items()}, requires,
                   calibration.spec if calibration else QuantSpec.from_dict(quant) if precision.quantized and quant else
                   QuantSpec() if precision.quantized else None, calibration)


@dataclass(frozen=True)
class ServingFormat:
    """How Triton Inference Server serves an engine: its platform, Kiln's files under the names
    Triton expects, and the largest batch the engine takes where it is narrower than the model's."""

    platform: str
    files: Mapping[str, str]
    max_batch: int | None = None
    field: str = "platform"  # Triton names some runtimes by `backend` instead (openvino)
