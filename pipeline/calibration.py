"""int8 calibration: what to calibrate with (a seeded set disjoint from the evaluation batches),
and the calibration file (one range per quantized layer input) that every int8 backend consumes
and every int8 artifact carries."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .choices import CALIBRATION_BATCH, CALIBRATION_METHODS, QuantSpec
from .errors import InputError, NumericsError
from .inputs import Inputs, Shape, make_inputs
from .models import ModelBundle

METHODS, BATCH = CALIBRATION_METHODS, CALIBRATION_BATCH
FILE = "calibration.json"
SCHEMA = 1


def calibration_sentences() -> list[str]:
    """Sentences kept apart from the evaluation ones (data/sentences.txt) so int8 is never judged on
    what it was calibrated on."""
    text = resources.files("pipeline").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def calibration_batches(bundle: ModelBundle, spec: QuantSpec) -> list[Inputs]:
    """`spec.samples` rows in batches of BATCH (the last may be smaller): a seeded draw of the
    calibration sentences through the tokenizer, or for a model without one, the seeded input kinds
    Kiln makes, with seeds no evaluation batch uses."""
    lo, hi = bundle.axis_ranges.get("seq", (spec.seq, spec.seq))
    seq = min(max(spec.seq, lo), hi)
    sizes = [BATCH] * (spec.samples // BATCH) + ([spec.samples % BATCH] if spec.samples % BATCH else [])
    lo_b, hi_b = bundle.axis_ranges.get("batch", (1, BATCH))
    if BATCH > hi_b:
        raise InputError(f"{bundle.name} takes at most batch {hi_b}; calibration needs batches of {BATCH}")
    sizes = [max(b, lo_b) for b in sizes]
    if bundle.tokenizer is not None and bundle.task != "generic":
        pool = calibration_sentences()
        if spec.samples > len(pool):
            raise InputError(f"a calibration set of {spec.samples} samples: Kiln ships {len(pool)} calibration "
                             f"sentences; give --calibration-samples {len(pool)} or fewer")
        rows = random.Random(spec.seed).sample(pool, spec.samples)
        k = bundle.options  # a multiple-choice row's options: the sentences after it, round the sample
        out, at = [], 0
        for b in sizes:
            enc = bundle.tokenizer([rows[(at + i) % len(rows)] for i in range(b * k)], padding="max_length", truncation=True,
                                   max_length=seq, return_tensors="pt")
            dims = (b, k, seq) if k > 1 else (b, seq)
            out.append({n: enc[n].to(torch.int64).view(dims) for n in ("input_ids", "attention_mask")})
            at += b
        return out
    kinds = ("random", "padded")
    return [make_inputs(bundle, Shape(b, seq), kinds[i % 2], seed=10_000 + spec.seed * 1000 + i) for i, b in enumerate(sizes)]


def check_finite(batches: Sequence[Inputs]) -> None:
    for i, batch in enumerate(batches):
        for name, t in batch.items():
            if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                raise InputError(f"calibration batch {i}: input {name!r} holds NaN or Inf: calibrate on finite data")


@dataclass(frozen=True)
class Layer:
    """One quantized layer input: `key` is the layer's module path and call index (the same in the
    captured program and in its ONNX export), `tensor` its input's name in the ONNX graph."""

    key: str
    node: str
    tensor: str
    low: float
    high: float


@dataclass(frozen=True)
class Calibration:
    spec: QuantSpec
    graph_hash: str
    layers: tuple[Layer, ...] = field(default_factory=tuple)
    rows: int = 0

    def __post_init__(self) -> None:
        if not self.layers:
            raise InputError("the model has no quantizable layers (no linear layer with weights): int8 has nothing to quantize")
        for layer in self.layers:
            if not (math.isfinite(layer.low) and math.isfinite(layer.high)) or layer.low > layer.high:
                raise NumericsError(f"calibration range of {layer.key} is [{layer.low}, {layer.high}]: the calibration "
                                    f"data gives NaN or Inf inside the model")

    def by_key(self) -> dict[str, Layer]:
        return {layer.key: layer for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "kind": "kiln-calibration", "graph_hash": self.graph_hash, "rows": self.rows,
                "spec": self.spec.to_dict(), "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        if d.get("kind") != "kiln-calibration" or d.get("schema") != SCHEMA:
            raise InputError(f"not a Kiln calibration file of schema {SCHEMA} (kind {d.get('kind')!r}, schema {d.get('schema')!r})")
        try:
            layers = tuple(Layer(str(x["key"]), str(x["node"]), str(x["tensor"]), float(x["low"]), float(x["high"])) for x in d["layers"])
            return cls(QuantSpec.from_dict(d["spec"]), str(d["graph_hash"]), layers, int(d.get("rows", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"malformed calibration file: {type(e).__name__}: {e}") from e

    def save(self, path: Path) -> Path:
        from .fsutil import atomic_write

        atomic_write(path, json.dumps(self.to_dict(), indent=1, allow_nan=False).encode())
        return path

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read the calibration file {path}: {e}") from e

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
