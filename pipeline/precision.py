"""The precisions: each a record (its dtype, whether it is quantized, the tolerance it is judged by), the set open."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import InputError, UnknownChoiceError

if TYPE_CHECKING:  # torch is imported when a dtype is first asked for: the CLI parses precisions without it
    import torch


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


class _Precisions(type):
    """Precision's class: iterating it gives every precision defined, in the order defined."""

    _known: dict[str, Precision]

    def __iter__(cls) -> Iterator[Precision]:
        return iter(list(cls._known.values()))


class Precision(str, metaclass=_Precisions):
    """A precision is a record, and the set is open: a name (which is what the string is), the dtype
    an engine's inputs, outputs and unquantized ops keep, whether its weights are quantized, and the
    tolerance it is judged by. `Precision("fp32")` looks one up; `Precision.define` adds one
    (docs/extending.md). Each backend's support table says whether it builds it."""

    _known: ClassVar[dict[str, Precision]] = {}
    FP32: ClassVar[Precision]
    FP16: ClassVar[Precision]
    BF16: ClassVar[Precision]
    INT8: ClassVar[Precision]
    INT8_DYNAMIC: ClassVar[Precision]
    value: str
    quantized: bool
    tolerance: Tolerance
    _dtype: str

    def __new__(cls, name: str) -> Precision:
        try:
            return cls._known[str(name)]
        except KeyError:
            raise ValueError(f"{name!r} is not a precision") from None

    @classmethod
    def define(cls, name: str, dtype: str, tolerance: Tolerance, quantized: bool = False) -> Precision:
        """A new precision (`dtype`: a torch dtype's name, "float32"); a name defined twice is refused,
        and so is one `--precisions` could not spell (upper case, blanks, commas)."""
        if name in cls._known or name == "fp64":  # fp64 is the shadow every precision is checked against
            raise ValueError(f"the precision {name!r} is already defined")
        if not name or name != name.strip().lower() or "," in name or " " in name:
            raise ValueError(f"a precision's name is lower case, without blanks or commas: {name!r}")
        p = str.__new__(cls, name)
        p.value, p._dtype, p.tolerance, p.quantized = name, dtype, tolerance, quantized
        cls._known[name] = p
        return p

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the engine's inputs, outputs and unquantized ops keep (fp32 for int8)."""
        import torch

        dtype: torch.dtype = getattr(torch, self._dtype)
        return dtype

    @classmethod
    def parse(cls, name: str | Precision) -> Precision:
        if isinstance(name, Precision):
            return name
        try:
            return cls(name.strip().lower())
        except ValueError:
            raise UnknownChoiceError("precision", name, [p.value for p in cls]) from None

    def __reduce__(self) -> tuple[Any, ...]:
        return Precision, (self.value,)  # unpickled (in a worker) as the one record of that name

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"Precision({self.value!r})"


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
Precision.FP32 = Precision.define("fp32", "float32", Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.99999, min_agreement=0.99))
Precision.FP16 = Precision.define("fp16", "float16", Tolerance(atol=2e-2, rtol=1e-2, min_cosine=0.999, min_agreement=0.95))
Precision.BF16 = Precision.define("bf16", "bfloat16", Tolerance(atol=1e-1, rtol=5e-2, min_cosine=0.995, min_agreement=0.9))
_INT8 = Tolerance(atol=1.0, rtol=1e-1, min_cosine=0.99, min_agreement=0.99, shadow_factor=2.0)
# weights and activations int8, activation ranges from a calibration
Precision.INT8 = Precision.define("int8", "float32", _INT8, quantized=True)
# weights int8, activations quantized at run time from their own range
Precision.INT8_DYNAMIC = Precision.define("int8-dynamic", "float32", _INT8, quantized=True)
INT8_FLOOR = Tolerance(atol=0.0, rtol=0.0, min_cosine=0.95, min_agreement=0.9)


def parse_precisions(text: str) -> list[Precision]:
    """'fp32,fp16' -> [FP32, FP16]; unknown names raise with the valid choices."""
    out = [Precision.parse(p) for p in text.split(",") if p.strip()]
    return list(dict.fromkeys(out))
