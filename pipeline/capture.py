"""Capture a model once with torch.export (batch and sequence dynamic); derive ONNX from it, cached by content."""

from __future__ import annotations

import copy
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim, ExportedProgram

from .choices import default_cache_dir
from .errors import BackendError
from .inputs import Shape, make_inputs
from .models import ModelBundle
from .precision import Precision
from .calibration import Calibration, QuantSpec
from . import progress
from .env import version
from .fsutil import cache_entry, cached_dir

DEFAULT_CACHE = default_cache_dir()


def _example(bundle: ModelBundle, seq: int | None = None) -> dict[str, torch.Tensor]:
    if bundle.example is not None:
        return bundle.example
    # batch 2 and seq 16 keep both axes dynamic (a size-1 example would be specialized).
    if "seq" not in bundle.axis_ranges:
        return make_inputs(bundle, Shape(2), "padded", seed=0)
    lo_s, hi_s = bundle.axis_ranges["seq"]
    return make_inputs(bundle, Shape(2, min(max(seq or 16, lo_s), hi_s)), "padded", seed=0)


def graph_hash(ep: ExportedProgram) -> str:
    """Content hash of a captured program: its graph code, signature, ranges and every weight."""
    h = hashlib.sha256()
    h.update(ep.graph_module.code.encode())
    h.update(str(ep.graph_signature).encode())
    h.update(str(sorted((str(k), str(v)) for k, v in ep.range_constraints.items())).encode())
    for name, t in sorted({**ep.state_dict, **ep.constants}.items()):
        for part, x in _plain(name, t):
            h.update(part.encode())
            h.update(str(x.dtype).encode() + str(tuple(x.shape)).encode())
            h.update(x.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim constants too
    return h.hexdigest()[:16]


def _plain(name: str, t: Any) -> list[tuple[str, torch.Tensor]]:
    """A weight as plain tensors: a tensor subclass (torchao's int8 weights) by the tensors it holds."""
    if not isinstance(t, torch.Tensor):
        return []
    if hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        return [p for n in inner for p in _plain(f"{name}.{n}", getattr(t, n))]
    return [(name, t)]


def export(bundle: ModelBundle, dtype: torch.dtype = torch.float32, module: torch.nn.Module | None = None,
           seq: int | None = None) -> ExportedProgram:
    """The bundle's module (or `module`, one derived from it: a quantized one) captured with batch and seq dynamic.

    When torch.export cannot keep an axis dynamic over the whole declared range ("Constraints
    violated"), it captures again with the ranges torch.export infers itself (Dim.AUTO), narrows
    the bundle's ranges to them and says so in the bundle's notes: a model that runs up to seq
    2047 is a model that runs, not a failure. That capture's example has sequence length `seq`
    (the run's longest) where given: a model whose code fixes the sequence at whatever size it is
    traced with (Funnel's pooling) is then captured at a size the run asks for."""
    if module is None:
        module = bundle.module if dtype == torch.float32 else copy.deepcopy(bundle.module).to(dtype)
    if not isinstance(module, torch.fx.GraphModule):
        module = module.eval()  # a module derived from a capture (quantized) is already in eval form and refuses .eval()
    try:
        with torch.no_grad():
            try:
                return torch.export.export(module, (), _example(bundle), dynamic_shapes=_dynamic_shapes(bundle))
            except Exception as e:
                if "Constraints violated" not in str(e):
                    raise
                violation = str(e)
            example = _example(bundle, seq)
            ep = torch.export.export(module, (), example, dynamic_shapes=_dynamic_shapes(bundle, auto=True))
    except Exception as e:  # torch raises many kinds here; the user needs the first line
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise BackendError(f"torch.export failed for {bundle.name}: {type(e).__name__}: {first}") from e
    _narrow(bundle, ep, violation, example)
    return ep


def _dynamic_shapes(bundle: ModelBundle, auto: bool = False) -> dict[str, dict[int, Any]]:
    dims = {axis: Dim.AUTO(min=lo, max=hi) if auto else Dim(axis, min=lo, max=hi) for axis, (lo, hi) in bundle.axis_ranges.items()}
    return {n: {i: dims[a] for i, a in enumerate(spec.dims) if isinstance(a, str)} for n, spec in bundle.inputs.items()}


def _narrow(bundle: ModelBundle, ep: ExportedProgram, violation: str, example: dict[str, torch.Tensor]) -> None:
    """The bundle's axis ranges, narrowed to what the program `ep` (captured with Dim.AUTO) takes:
    its range constraints, less single sizes the violation excluded at either end ("!= 2048")."""
    shapes = {n.name: n.meta["val"].shape for n in ep.graph.nodes if n.op == "placeholder" and "val" in n.meta}
    excluded = {int(v) for v in re.findall(r"\]\s*!=\s*(\d+)", violation)}
    for axis, (lo, hi) in list(bundle.axis_ranges.items()):
        new_lo, new_hi = lo, hi
        for name, spec in bundle.inputs.items():
            for i, a in enumerate(spec.dims):
                if a != axis or name not in shapes:
                    continue
                size = shapes[name][i]
                if not isinstance(size, int) and size.node.expr.is_number:  # a SymInt the program specialized (Funnel's seq)
                    size = int(size.node.expr)
                if isinstance(size, int):
                    new_lo, new_hi = max(new_lo, size), min(new_hi, size)
                    continue
                vr = ep.range_constraints.get(size.node.expr)
                if vr is not None:
                    # a lower bound of 2 is how torch.export writes every backed size (0/1 are
                    # specialized in its reasoning); the program still takes 1, which a test checks
                    new_lo = max(new_lo, int(vr.lower)) if int(vr.lower) > 2 else new_lo
                    new_hi = min(new_hi, int(vr.upper)) if vr.upper.is_finite else new_hi  # type: ignore[union-attr]
        while new_hi in excluded and new_hi > new_lo:
            new_hi -= 1
        while new_lo in excluded and new_lo < new_hi:
            new_lo += 1
        if (new_lo, new_hi) != (lo, hi):
            bundle.axis_ranges[axis] = (new_lo, new_hi)
            what = f"fixed at {new_lo}" if new_lo == new_hi else f"narrowed to [{new_lo}, {new_hi}]"
            traced = {int(t.shape[i]) for n, t in example.items() for i, a in enumerate(bundle.inputs[n].dims) if a == axis}
            why = ("the model's code fixes it at the size it is captured at, the run's longest" if traced == {new_lo} == {new_hi}
                   else "the model's code constrains it")
            bundle.notes.append(f"torch.export: {axis} {what} from [{lo}, {hi}] ({why})")


@dataclass
class Captured:
    """One captured program and what is derived from it. Backends receive this, never the raw model."""

    bundle: ModelBundle
    program: ExportedProgram
    graph_hash: str
    capture_s: float
    cache_dir: Path = DEFAULT_CACHE
    quant: QuantSpec = field(default_factory=QuantSpec)  # how int8 engines are calibrated
    calibrations: dict[QuantSpec, Calibration] = field(default_factory=dict, repr=False)
    _programs: dict[Precision, ExportedProgram] = field(default_factory=dict, repr=False)
    # the program is already this precision's (a generation step quantized before it was captured):
    # a backend compiling it at that precision takes the quantized module as it is (backends/quantize.pt2e)
    prequantized: Precision | None = None

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def example(self) -> dict[str, torch.Tensor]:
        """Inputs the program was captured and exported with."""
        return _example(self.bundle)

    def program_at(self, precision: Precision) -> ExportedProgram:
        """The fp32 capture, or the same module captured with its weights cast to `precision`."""
        if precision.dtype == torch.float32:
            return self.program
        if precision not in self._programs:
            self._programs[precision] = export(self.bundle, precision.dtype)
        return self._programs[precision]

    def onnx_path(self, precision: Precision = Precision.FP32) -> Path:
        """ONNX exported by the dynamo exporter from program_at(precision); cached under cache_dir by graph hash."""
        final = cache_entry(self.cache_dir, "onnx", f"{self.graph_hash}-{precision.value}",
                            {"exporter": "dynamo", **{d: version(d) for d in ("torch", "onnx", "onnxscript")}})

        def export_onnx(tmp: Path) -> None:
            progress.report(f"exporting the {precision} program to ONNX (torch.onnx, dynamo exporter)")
            program = self.program_at(precision)
            kw = dict(kwargs=_example(self.bundle), f=str(tmp / "model.onnx"), dynamo=True, verbose=False,
                      input_names=list(self.bundle.input_names), output_names=list(self.bundle.output_names))
            try:
                torch.onnx.export(program, (), **kw)  # type: ignore[arg-type]
            except Exception as e:
                # The exporter's own decompositions can fail on a view of a transposed tensor with
                # symbolic sizes (T5's attention). Decomposed to core ATen first, the same program
                # exports; it is not the first choice because fused ops (sdpa) are split on the way.
                progress.report(f"ONNX export: {type(e).__name__}; exporting the program decomposed to core ATen instead")
                torch.onnx.export(program.run_decompositions(), (), **kw)  # type: ignore[arg-type]

        try:
            return cached_dir(final, export_onnx) / "model.onnx"
        except Exception as e:
            raise BackendError(f"ONNX export failed: {_exporter_cause(e)}") from e


def _exporter_cause(e: BaseException) -> str:
    """The exporter's own cause (its message opens with generic next steps and a summary below),
    without the terminal colours it writes into the text."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    _, _, summary = text.partition("## Exception summary")
    cause = next((line for line in summary.splitlines() if line.strip()), "")
    if cause.startswith("<class '"):  # "<class 'a.b.DispatchError'>: message"
        cause = re.sub(r"^<class '(?:[\w.]*\.)?(\w+)'>", r"\1", cause)
    return cause or f"{type(e).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"


def capture(bundle: ModelBundle, cache_dir: Path | str | None = None, quant: QuantSpec | None = None,
            seq: int | None = None) -> Captured:
    """`seq`: the run's longest sequence, where the model's code fixes the length it is captured at (see `export`)."""
    t0 = time.perf_counter()
    ep = export(bundle, seq=seq)
    return Captured(bundle, ep, graph_hash(ep), time.perf_counter() - t0, Path(cache_dir) if cache_dir else DEFAULT_CACHE,
                    quant or QuantSpec())
