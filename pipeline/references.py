"""What every engine is judged against, computed once per run: the seeded input batches, eager fp32
(the reference), eager fp64 (the shadow truth), eager at each lower precision (what that precision
itself costs), and the named axes of each output."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .compare import Comparator, Comparison, unpadded
from .errors import BackendError, InputError, KilnError, NumericsError, short
from .inputs import Inputs, Shape, make_inputs
from .models import ModelBundle
from .modelcheck import available_memory
from .precision import Precision, Tolerance

KINDS = ("text", "random", "padded")  # real sentences, uniform ids, padding-heavy masks
Tensors = dict[str, torch.Tensor]


def _dtype(module: torch.nn.Module) -> torch.dtype | None:
    return next((t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)


def _eager(module: torch.nn.Module, names: Sequence[str], inputs: Inputs) -> Tensors:
    """The module's outputs; floating inputs cast to its dtype (a module cast to fp64 or fp16 fed
    fp32 inputs fails unless its own code casts them, as Hugging Face's vision models do)."""
    dtype = _dtype(module)
    if dtype is not None:
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return dict(zip(names, module(**inputs)))


def _over(module: torch.nn.Module, bundle: ModelBundle, batches: dict[Shape, list[Inputs]]) -> dict[Shape, list[Tensors]]:
    return {s: [_eager(module, bundle.output_names, b) for b in bs] for s, bs in batches.items()}


def _nonfinite(outs: dict[Shape, list[Tensors]], batches: dict[Shape, list[Inputs]], task: str) -> Shape | None:
    """The first shape where an output is NaN or Inf at real tokens (what padding positions hold is never compared)."""
    return next((s for s, o in outs.items() for x, b in zip(o, batches[s]) for t in x.values()
                 if not torch.isfinite(t)[unpadded(b.get("attention_mask"), t, task)].all()), None)


def _shadow(bundle: ModelBundle, batches: dict[Shape, list[Inputs]]) -> dict[Shape, list[Tensors]] | str:
    """Eager fp64 at every batch, or why there is none: an op with no float64 kernel (a
    mixture-of-experts' grouped matmul), or NaN or Inf where fp32 has none (an explicit softmax
    over a fully masked row, which fp32 survives and fp64 does not)."""
    try:
        outs = _over(copy.deepcopy(bundle.module).double(), bundle, batches)
    except Exception as e:  # the model's own code may raise anything in fp64
        return f"eager fp64 fails: {short(e)}"
    bad = _nonfinite(outs, batches, bundle.task)
    return outs if bad is None else f"eager fp64 gives NaN or Inf at {bad} where fp32 does not"


@dataclass
class References:
    bundle: ModelBundle
    batches: dict[Shape, list[Inputs]]
    outputs: dict[str, dict[Shape, list[Tensors]]]  # "fp32", "fp64" and each lower precision's value
    # a lower precision whose eager reference could not be made, and why: its rows fail, the others go on
    failed: dict[str, str] = field(default_factory=dict)

    @classmethod
    def compute(cls, bundle: ModelBundle, shapes: Sequence[Shape], precisions: Sequence[Precision] = (),
                say: Callable[[str], None] | None = None,
                quantized: Callable[[Precision], Callable[[Inputs], Tensors]] | None = None) -> References:
        """`quantized(p)` gives the reference engine at an int8 precision (a module cast to a dtype
        cannot say what int8 costs); without it, int8 precisions are refused."""
        lower = [p for p in dict.fromkeys(precisions) if p != Precision.FP32]
        if say:
            say("reference outputs: eager fp32, fp64 shadow" + "".join(f", eager {p}" for p in lower))
        batches = {s: [make_inputs(bundle, s, kind, seed=i) for i, kind in enumerate(KINDS)] for s in shapes}
        outputs: dict[str, dict[Shape, list[Tensors]]] = {"fp32": _over(bundle.module, bundle, batches)}
        bad = _nonfinite(outputs["fp32"], batches, bundle.task)
        if bad is not None:
            raise NumericsError(f"eager fp32 itself gives NaN or Inf on {bundle.name} at {bad}: the model or inputs are broken")
        shadow = _shadow(bundle, batches)
        if isinstance(shadow, str):  # a second opinion that cannot be had never stops the run: fp32 stands in
            note = f"no fp64 shadow ({shadow}): judged against eager fp32 alone"
            if say:
                say(note)
            if note not in bundle.notes:
                bundle.notes.append(note)
            shadow = outputs["fp32"]
        outputs["fp64"] = shadow
        for p in lower:
            if not p.quantized:
                outputs[p.value] = _over(copy.deepcopy(bundle.module).to(p.dtype), bundle, batches)
        failed: dict[str, str] = {}
        for p in (p for p in lower if p.quantized):
            if quantized is None:
                raise InputError(f"{p} needs a quantized reference engine, and none was given")
            try:
                engine = quantized(p)
                with torch.no_grad():
                    outputs[p.value] = {s: [engine(b) for b in bs] for s, bs in batches.items()}
            except KilnError:  # Kiln's own refusals (nothing to quantize) stop the run before any work, as ever
                raise
            except Exception as e:  # a quantizer may raise anything on a model it does not fit
                failed[p.value] = f"the eager {p} reference failed on {bundle.name}: {short(e)}"
                if say:
                    say(failed[p.value])
        return cls(bundle, batches, outputs, failed)

    @property
    def shapes(self) -> list[Shape]:
        return list(self.batches)

    def judge(self, model: Any, shapes: Sequence[Shape], precision: Precision,
              tolerances: Tolerance | Mapping[str, Tolerance] | None = None) -> Comparison:
        """One verdict for `model` (anything called with named tensors) over every batch at `shapes`."""
        if precision.value in self.failed:
            raise BackendError(f"nothing at {precision} can be judged: {self.failed[precision.value]}")
        comp = Comparator(precision, self.bundle.task, tolerances)
        at_precision = self.outputs[precision.value]
        for s in shapes:
            for i, batch in enumerate(self.batches[s]):
                device = getattr(model, "device", "cpu")
                out = model({k: v.to(device) for k, v in batch.items()})
                comp.add(out, self.outputs["fp32"][s][i], self.outputs["fp64"][s][i], at_precision[s][i],
                         batch.get("attention_mask"), task=self.task_batches()[i])
        return comp.result()

    def task_batches(self, kinds: Sequence[str] = KINDS) -> list[bool]:
        """Which batches count for task agreement: the real sentences where the model has a
        tokenizer (the nearest neighbour among random ids flips on noise), the picture-like
        images of an image model, every batch otherwise."""
        if self.bundle.vision:  # pixel noise is no picture: its labels flip on rounding
            return [k != "random" for k in kinds]
        return [self.bundle.tokenizer is None or k == "text" for k in kinds]

    def saved(self, shape: Shape, kinds: Sequence[str] = ("text", "padded")) -> tuple[list[Inputs], list[Tensors]]:
        """The inputs and eager fp32 outputs an artifact carries for `kiln verify`."""
        idx = [KINDS.index(k) for k in kinds]
        return [self.batches[shape][i] for i in idx], [self.outputs["fp32"][shape][i] for i in idx]


def memory_needed(bundle: ModelBundle, shapes: Sequence[Shape], precisions: Sequence[Precision]) -> int:
    """Bytes the references of a run hold, plus the comparator's float64 working copies at the
    largest shape: every batch's outputs in fp32, fp64 and each lower precision."""
    axes = output_axes(bundle)

    def elements(s: Shape) -> int:
        n = 0
        for dims in axes.values():
            count = 1
            for d in dims:
                count *= getattr(s, d) if isinstance(d, str) else d
            n += count
        return n

    per_element = 4 + 8 + sum(torch.finfo(p.dtype).bits // 8 for p in set(precisions) if p != Precision.FP32)
    held = sum(len(KINDS) * elements(s) * per_element for s in shapes)
    return held + 6 * 8 * max((elements(s) for s in shapes), default=0)


def check_memory(bundle: ModelBundle, shapes: Sequence[Shape], precisions: Sequence[Precision]) -> None:
    """Refuses, before anything is computed, shapes whose reference outputs cannot fit in memory."""
    need, have = memory_needed(bundle, shapes, precisions), available_memory()
    if have is not None and need > 0.8 * have:
        big = max(shapes, key=lambda s: s.batch * s.seq)
        raise InputError(f"the references of {bundle.name} at {', '.join(map(str, shapes))} need about {need / 2**30:.1f} GiB "
                         f"({len(KINDS)} batches of every output in fp32, fp64 and each lower precision) and this machine "
                         f"has {have / 2**30:.1f} GiB available: use smaller shapes than {big}")


def _probes(bundle: ModelBundle) -> tuple[Shape, Shape]:
    """Two small shapes inside the model's ranges (a model whose sequence starts at 400 samples, or
    is fixed at 32), batch and seq apart by different steps so that no dim could follow both."""
    def two(axis: str, first: int, step: int) -> tuple[int, int]:
        lo, hi = bundle.axis_ranges.get(axis, (1, 2**31))
        x = min(max(first, lo), hi)
        return x, x + step if x + step <= hi else max(x - step, lo)

    b1, b2 = two("batch", 2, 1)
    if "seq" not in bundle.axis_ranges:
        return Shape(b1), Shape(b2)
    s1, s2 = two("seq", 3, 2)
    return Shape(b1, s1), Shape(b2, s2)


def output_axes(bundle: ModelBundle) -> dict[str, list[int | str]]:
    """Each output's dims, with batch and seq named: eager at two small shapes tells which dims follow which axis."""
    a, b = _probes(bundle)
    oa, ob = (_eager(bundle.module, bundle.output_names, make_inputs(bundle, s, "random")) for s in (a, b))
    out: dict[str, list[int | str]] = {}
    for name in bundle.output_names:
        dims: list[int | str] = []
        for da, db in zip(oa[name].shape, ob[name].shape):
            dims.append("batch" if (da, db) == (a.batch, b.batch) else "seq" if (da, db) == (a.seq, b.seq) else int(da))
        out[name] = dims
    return out
