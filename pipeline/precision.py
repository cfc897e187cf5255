"""The only place dtype names are spelled, and the default tolerances per precision."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from .errors import InputError, UnknownChoiceError

if TYPE_CHECKING:  # torch is imported when a dtype is first asked for: the CLI parses precisions without it
    import torch


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"                  # weights and activations int8, activation ranges from a calibration
    INT8_DYNAMIC = "int8-dynamic"  # weights int8, activations quantized at run time from their own range

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the engine's inputs, outputs and unquantized ops keep (fp32 for int8)."""
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.value, torch.float32)

    @property
    def quantized(self) -> bool:
        return self in (Precision.INT8, Precision.INT8_DYNAMIC)

    @classmethod
    def parse(cls, name: str | Precision) -> Precision:
        if isinstance(name, Precision):
            return name
        try:
            return cls(name.strip().lower())
        except ValueError:
            raise UnknownChoiceError("precision", name, [p.value for p in cls]) from None

    def __str__(self) -> str:
        return self.value


def parse_precisions(text: str) -> list[Precision]:
    """'fp32,fp16' -> [FP32, FP16]; unknown names raise with the valid choices."""
    out = [Precision.parse(p) for p in text.split(",") if p.strip()]
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Tolerance:
    """When a candidate output counts as equal to the reference.

    Elementwise, as numpy.allclose: |cand - ref| <= atol + rtol * |ref|, with atol raised to
    `shadow_factor` times eager's own max error at this precision against the fp64 shadow
    (so an fp16 engine is judged against what fp16 itself costs, not a fixed 1e-5).
    Cosine similarity of the whole output must reach `min_cosine`; task agreement (argmax
    for logits, nearest-neighbour ranking for embeddings) must reach `min_agreement`.
    """

    atol: float
    rtol: float
    min_cosine: float
    min_agreement: float
    shadow_factor: float = 4.0  # 0: already widened (a tolerance recorded at build), applied as it is

    def __post_init__(self) -> None:
        values = asdict(self)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values.values()):
            raise InputError(f"a tolerance must be finite: {values}")
        if min(self.atol, self.rtol, self.shadow_factor, self.min_agreement) < 0 or not -1 <= self.min_cosine <= 1:
            raise InputError(f"a tolerance needs atol, rtol, shadow_factor >= 0, min_cosine in [-1, 1], "
                             f"min_agreement in [0, 1]: {values}")
        if self.min_agreement > 1:
            raise InputError(f"min_agreement is at most 1: {values}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tolerance:
        return cls(**{f.name: float(d[f.name]) for f in fields(cls) if f.name in d})


# Where these come from: fp32 compilers reorder reductions and fuse (observed max abs error
# 1e-6..6e-5 on MiniLM hidden states, |x| up to ~10): atol 1e-4 + rtol 1e-4 leaves ~2x headroom.
# fp16 keeps ~11 bits: eager fp16 itself is ~4e-3..1e-2 off fp64 on MiniLM, hence 2e-2 / 1e-2.
# bf16 keeps 8 bits: eager bf16 is ~3e-2..8e-2 off, hence 1e-1 / 5e-2. The shadow factor widens
# atol further only where eager at that precision is itself worse (large models).
# int8 is judged by the task, not elementwise (MiniLM's outlier dimensions put single hidden-state
# values 1-5 off while every sentence embedding keeps cosine > 0.99): atol/rtol are reported only;
# the verdict is sentence-embedding or whole-output cosine >= 0.99 and agreement >= 0.99, each
# loosened to what the int8 reference (eager PT2E) itself reaches, less the same margin the
# shadow factor gives fp16, but never below INT8_FLOOR: past that the quantization loses the task.
DEFAULT_TOLERANCES: dict[Precision, Tolerance] = {
    Precision.FP32: Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.99999, min_agreement=0.99),
    Precision.FP16: Tolerance(atol=2e-2, rtol=1e-2, min_cosine=0.999, min_agreement=0.95),
    Precision.BF16: Tolerance(atol=1e-1, rtol=5e-2, min_cosine=0.995, min_agreement=0.9),
    Precision.INT8: Tolerance(atol=1.0, rtol=1e-1, min_cosine=0.99, min_agreement=0.99, shadow_factor=2.0),
    Precision.INT8_DYNAMIC: Tolerance(atol=1.0, rtol=1e-1, min_cosine=0.99, min_agreement=0.99, shadow_factor=2.0),
}
INT8_FLOOR = Tolerance(atol=0.0, rtol=0.0, min_cosine=0.95, min_agreement=0.9)
