"""Apache TVM (Relax): the captured program through from_exported_program, operator fusion,
MetaSchedule tuning under a time budget with a reused database, and export_library.

On the CPU an untuned build has no schedules and runs far slower than eager (docs/benchmarks.md, Apache TVM), so
tuning is on by default, per static shape (MetaSchedule tunes static shapes); with
trials_per_task=0 the build stays dynamic and every row says it is untuned. On CUDA, dlight's
default GPU schedules make an untuned build sensible; this wheel carries no cuBLAS/DNNL for
library dispatch. lower.py builds the Relax module, tune.py runs MetaSchedule, engine.py runs
the result.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.capture import Captured
from pipeline.env import version
from pipeline.errors import BackendError, InputError
from pipeline.fsutil import cache_entry, lock
from pipeline.inputs import Shape
from pipeline.manifest import Manifest
from pipeline.precision import Precision

from ..base import Availability, Backend, BackendOptions, CompiledModel, EngineSpec, ok, refused
from .engine import TvmModel, library_shape
from .lower import bind_shape, import_program, kernels, lower, target_for
from .tune import apply_database, tune

UNTUNED = "untuned TVM build (tvm.trials_per_task=0): expect it far slower than eager (no schedules: naive loops)"


@dataclass(frozen=True)
class TvmOptions(BackendOptions):
    trials_per_task: int = 64    # MetaSchedule trials per kernel at most (CPU); 0: no tuning (dynamic shapes, warned)
    budget_s: float = 600.0      # wall-clock cap on tuning each static shape
    fast_math: bool = True       # GELU as 0.5x(1+fast_erf(x/sqrt2)) and FastMathTransform: vectorized erf/exp/tanh
    arch: str | None = None      # CUDA arch (sm_90); default: the device's

    def __post_init__(self) -> None:
        if self.trials_per_task < 0:
            raise InputError(f"tvm.trials_per_task={self.trials_per_task}: must be 0 (no tuning) or more")
        if not (math.isfinite(self.budget_s) and self.budget_s >= 0):
            raise InputError(f"tvm.budget_s={self.budget_s}: must be a finite number of seconds, 0 or more")


INT8_REFUSAL = ("TVM 0.27's Relax importer for exported programs has no converter for PT2E's quantize/dequantize "
                "ops (quantized_decomposed.quantize_per_tensor)")


class TvmBackend(Backend):
    name = "tvm"
    # The quantized program's Q/DQ ops (quantized_decomposed.quantize_per_tensor and kin) have no
    # converter in TVM 0.27's exported-program importer (a test checks that this is still so).
    # fp16 generation: TVM 0.27's importer refuses the fp16-cast step.
    support = {Precision.FP32: ok(), Precision.FP16: ok(generates=False),
               Precision.BF16: refused("TVM 0.27's ToMixedPrecision makes fp16 only (bf16 fails in layer_norm)"),
               Precision.INT8: refused(INT8_REFUSAL), Precision.INT8_DYNAMIC: refused(INT8_REFUSAL)}
    options_type = TvmOptions
    # the .so links against this TVM runtime and its FFI
    requires = {"apache-tvm": "exact", "apache-tvm-ffi": "minor"}

    def _check(self, device: str) -> Availability:
        try:
            import tvm
        except ImportError as e:
            return Availability.no(f"apache-tvm is not installed (pip install -e '.[tvm]'): {e}")
        if device.startswith("cuda") and not tvm.cuda().exist:
            return Availability.no("this TVM runtime sees no CUDA device")
        return Availability.yes()

    def _compile(self, captured: Captured, spec: EngineSpec, shapes: list[Shape]) -> CompiledModel:
        import tvm

        options: TvmOptions = spec.options  # type: ignore[assignment]
        target = target_for(spec.device, options.arch)
        t0 = time.monotonic()
        imported = import_program(captured)
        info: dict[str, Any] = {"target": str(target), "library_dispatch": "none in this wheel", "fast_math": options.fast_math,
                                "axes": {n: list(s.dims) for n, s in captured.bundle.inputs.items()}}
        cuda = spec.device.startswith("cuda")
        if cuda or options.trials_per_task <= 0:
            mod = lower(imported, target, spec.precision, options.fast_math)
            info["kernels_after_fusion"] = kernels(mod)
            info.update(shapes="dynamic", schedules="dlight defaults" if cuda else "none (untuned)")
            if not cuda:
                info["warning"] = UNTUNED
            libs: dict[Shape | None, Any] = {None: tvm.compile(mod, target=target)}
        else:
            libs = self._tuned(captured, imported, target, spec.precision, options, shapes, info)
        info["tvm_build_s"] = round(time.monotonic() - t0, 1)
        return TvmModel(spec, libs, info)

    def step_options(self, options: BackendOptions, step: Literal["prefill", "decode"]) -> BackendOptions:
        """The decode step is tuned like a forward model (static shapes: one token at each batch
        asked); the prefill step runs once per prompt, of any length, so it is built dynamic with
        the default schedules (untuned: its rows say so)."""
        opts: TvmOptions = options  # type: ignore[assignment]
        return dataclasses.replace(opts, trials_per_task=0) if step == "prefill" else opts

    def _tuned(self, captured: Captured, imported: Any, target: Any, precision: Precision, options: TvmOptions,
               shapes: list[Shape], info: dict[str, Any]) -> dict[Shape | None, Any]:
        """One library per static shape, each from its own tuning database."""
        import tvm
        import tvm_ffi

        if not shapes:
            raise BackendError("a tuned TVM build needs the shapes to tune for (MetaSchedule tunes static shapes)")
        dims = {n: s.dims for n, s in captured.bundle.inputs.items()}
        libs: dict[Shape | None, Any] = {}
        info["tuning"], info["kernels_after_fusion"] = {}, {}
        unscheduled: dict[str, list[str]] = {}
        for s in shapes:
            # Shapes are fixed before lowering, so the mask and position arithmetic folds away
            # and every kernel is static (MetaSchedule mis-handles symbolic kernels).
            static = lower(bind_shape(imported, s, dims), target, precision, options.fast_math, prepack=True)
            info["kernels_after_fusion"][str(s)] = kernels(static)
            # Keyed by the lowered module itself (weights are in the graph hash), so any change to the
            # graph, the pass list or TVM gets its own database rather than one whose records no longer match;
            # and by the CPU and thread count the candidates were measured with.
            work = cache_entry(captured.cache_dir, "tvm", f"{captured.graph_hash}-{precision.value}-{s}",
                               {"module": tvm_ffi.structural_hash(static, skip_tensor_content=True) & (2**64 - 1),
                                "cpu": target.attrs["mcpu"], "threads": int(target.attrs["num-cores"]),
                                "apache-tvm": version("apache-tvm"), "apache-tvm-ffi": version("apache-tvm-ffi")})
            with lock(work):  # two tunings of one database take turns; the second then reuses the first's
                info["tuning"][str(s)] = {k: v for k, v in tune(static, target, work, options.trials_per_task,
                                                                options.budget_s).items() if k != "files"}
                tuned_mod, unscheduled[str(s)] = apply_database(static, target, work)
            libs[s] = tvm.compile(tuned_mod, target=target)
        info.update(shapes=[str(s) for s in shapes], kernels_unscheduled=unscheduled,
                    schedules=f"MetaSchedule, at most {options.trials_per_task} trials/kernel, budget {options.budget_s:.0f}s per shape")
        notes = [f"static shapes {', '.join(map(str, shapes))} (MetaSchedule tunes static shapes; other shapes are refused)"]
        for k, t in info["tuning"].items():
            notes.append(f"{k}: {t.get('trials_measured', '?')} trials in {t['seconds']:.0f}s{' (database reused)' if t['reused'] else ''}"
                         f"{', budget reached' if t.get('hit_budget') else ''}")
            if unscheduled[k]:  # e.g. embedding gathers, whose measurement on random indices fails
                notes.append(f"kept as generated at {k}: {', '.join(unscheduled[k])}")
        info["note"] = "; ".join(notes)
        return libs

    def _load(self, directory: Path, spec: EngineSpec, manifest: Manifest) -> CompiledModel:
        import tvm

        libs = {library_shape(name): tvm.runtime.load_module(str(directory / name)) for name in manifest.files
                if name.endswith(".so")}
        axes = {n: list(d) for n, d in manifest.engine.get("axes", {}).items()}
        return TvmModel(spec, libs, {"loaded_from": str(directory), "axes": axes})
