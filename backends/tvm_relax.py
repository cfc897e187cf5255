"""Apache TVM (Relax): the captured program through from_exported_program, operator fusion,
MetaSchedule tuning under a time budget with a reused database, and export_library.

On the CPU an untuned build is ~90x slower than eager on MiniLM (measured: NOTES.md), so tuning
is on by default, per static shape (MetaSchedule tunes static shapes); with trials_per_task=0
the build stays dynamic and every row says it is untuned. On CUDA, dlight's default GPU
schedules make an untuned build sensible; this wheel carries no cuBLAS/DNNL for library dispatch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.capture import Captured
from pipeline.errors import BackendError, ShapeError
from pipeline.inputs import Shape
from pipeline.precision import Precision

from .base import Availability, Backend, BackendOptions, CompiledModel, Tensors

UNTUNED = "untuned TVM build (tvm.trials_per_task=0): expect it far slower than eager (MiniLM 1x128: ~90x on the CPU)"


@dataclass(frozen=True)
class TvmOptions(BackendOptions):
    trials_per_task: int = 8     # MetaSchedule trials per kernel on the CPU; 0: no tuning (dynamic shapes, warned)
    budget_s: float = 600.0      # wall-clock cap on tuning each static shape
    fast_math: bool = True       # GELU as 0.5x(1+fast_erf(x/sqrt2)) and FastMathTransform: vectorized erf/exp/tanh
    arch: str | None = None      # CUDA arch (sm_90); default: the device's


def target_for(device: str, arch: str | None = None) -> Any:
    import tvm

    if device.startswith("cuda"):
        if arch is None:
            props = torch.cuda.get_device_properties(device)
            arch = f"sm_{props.major}{props.minor}"
        return tvm.target.Target({"kind": "cuda", "arch": arch})  # Target("cuda") alone means sm_50
    # "llvm -mcpu=native" is refused and a bare "llvm" builds generic x86: name the host CPU.
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": torch.get_num_threads()})


def _gelu_legalize(bb: Any, call: Any) -> Any:
    from tvm import tirx as tir
    from tvm import topi

    def f(x: Any) -> Any:
        c = lambda v: tir.const(v, x.dtype)  # noqa: E731
        return topi.multiply(topi.multiply(x, c(0.5)), topi.add(c(1.0), topi.fast_erf(topi.multiply(x, c(0.7071067811865476)))))

    return bb.call_te(f, call.args[0], primfunc_name_hint="gelu")


def import_program(captured: Captured) -> Any:
    """The captured program as a Relax IRModule; unsupported ops are named in the error."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        return from_exported_program(captured.program, unwrap_unit_return_tuple=True)
    except Exception as e:
        raise BackendError(f"TVM could not import the program: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def lower(mod: Any, target: Any, precision: Precision, fast_math: bool) -> Any:
    """Legalize, fold, fuse: the Relax pipeline up to where schedules apply."""
    import tvm
    from tvm import relax

    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
    if precision == Precision.FP16:
        passes.append(relax.transform.ToMixedPrecision(out_dtype="float32"))
    if fast_math:  # exp (softmax) and tanh to their vectorizable approximations; GELU's erf is done below
        passes.append(relax.transform.FastMathTransform())
    passes += [relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.gelu": _gelu_legalize} if fast_math else None),
               relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(), relax.transform.FuseOps(),
               relax.transform.FuseTIR()]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def kernels(mod: Any) -> int:
    import tvm

    return sum(1 for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


def bind_shape(mod: Any, shape: Shape, dims: dict[str, tuple[Any, ...]]) -> Any:
    """Fix the dynamic batch and seq of the imported `main` to one shape (MetaSchedule tunes static shapes)."""
    from tvm import relax
    from tvm import tirx as tir

    params = mod["main"].params
    names = [p.name for p in params]
    binding: dict[Any, int] = {}
    for name, axes in dims.items():
        for dim, axis in zip(params[names.index(name)].ty.shape, axes):
            if isinstance(dim, tir.Var) and axis in ("batch", "seq"):
                binding[dim] = getattr(shape, axis)
    return relax.transform.BindSymbolicVars(binding, "main")(mod)


class BudgetSpent(Exception):
    """Raised from inside MetaSchedule to stop tuning at the deadline."""


def check_budget(deadline: float, task_id: int) -> None:
    if time.monotonic() > deadline:
        raise BudgetSpent(f"tuning budget spent at task {task_id}")


def _budget_callback(deadline: float) -> Any:
    """Stops tuning once the deadline has passed. It runs after AddToDatabase, so every measured
    batch is already in the JSON database (which writes each record as it comes). Raising is the
    stop MetaSchedule honours at once; terminating tasks from a callback races its own clean-up,
    which then terminates a finished task a second time and fails."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Budget(PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, *args: Any) -> None:
            check_budget(deadline, task_id)

    return Budget()


def tune(mod: Any, target: Any, work_dir: Path, trials_per_task: int, deadline: float) -> dict[str, Any]:
    """MetaSchedule into work_dir's JSON database; a database already tuned this far is reused as is."""
    from tvm.s_tir import meta_schedule as ms

    marker = work_dir / "kiln-tuned.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("trials_per_task", 0) >= trials_per_task:
            return {**done, "reused": True}
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    callbacks = [*ms.MeasureCallback.create("default"), _budget_callback(deadline)]
    try:
        ms.relax_integration.tune_relax(mod, {}, target, str(work_dir), max_trials_global=trials_per_task * 10_000,
                                        max_trials_per_task=trials_per_task, num_trials_per_iter=min(64, trials_per_task),
                                        measure_callbacks=callbacks, seed=0,
                                        # joins each task as soon as it is measured, so the budget callback runs
                                        # then; the gradient scheduler joins only after a first pass over all tasks
                                        task_scheduler="round-robin")
    except Exception as e:  # the FFI hands BudgetSpent back wrapped in its own error type
        if "tuning budget spent" not in str(e):
            raise
    info = {"trials_per_task": trials_per_task, "seconds": round(time.monotonic() - t0, 1), "hit_budget": time.monotonic() > deadline}
    if info["hit_budget"]:  # a cut-short database is kept for reuse, but asks for more next time
        info["trials_per_task"] = 0
    marker.write_text(json.dumps(info))
    return {**info, "trials_per_task": trials_per_task, "reused": False}


def apply_database(mod: Any, target: Any, work_dir: Path) -> Any:
    from tvm import relax

    with target:
        return relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)


def cuda_library(captured: Captured, arch: str, precision: Precision = Precision.FP32) -> tuple[Any, int]:
    """A CUDA build with dlight's default schedules, made without a GPU: the library carries CUDA
    source that the TVM runtime compiles when it loads (NVRTC or nvcc where it runs)."""
    import tvm

    target = target_for("cuda", arch)
    mod = lower(import_program(captured), target, precision, fast_math=False)
    return tvm.compile(mod, target=target), kernels(mod)


def _shape_of(inputs: Tensors, axes: dict[str, list[Any]]) -> Shape:
    """The (batch, seq) of a call, read from the inputs' named dynamic axes (1 where a model has no such axis)."""
    sizes = {"batch": 1, "seq": 1}
    for name, dims in axes.items():
        for size, axis in zip(inputs[name].shape, dims):
            if axis in sizes:
                sizes[axis] = int(size)
    return Shape(sizes["batch"], sizes["seq"])


class TvmModel(CompiledModel):
    options: TvmOptions

    def __init__(self, libs: dict[Shape | None, Any], info: dict[str, Any], **kw: Any) -> None:
        super().__init__(**kw)
        import tvm
        from tvm import relax

        self.dev = tvm.cuda(torch.device(self.device).index or 0) if self.device.startswith("cuda") else tvm.cpu()
        self.libs, self.info = libs, info
        self.vms = {s: relax.VirtualMachine(lib, self.dev) for s, lib in libs.items()}

    def run(self, inputs: Tensors) -> Tensors:
        import tvm

        key: Shape | None = None if None in self.vms else _shape_of(inputs, self.info["axes"])
        if key not in self.vms:
            built = ", ".join(str(s) for s in self.vms)
            raise ShapeError(f"this TVM engine was tuned for the static shapes {built}; got {key}")
        args = [tvm.runtime.tensor(t.detach().cpu().numpy(), self.dev) for t in inputs.values()]
        out = self.vms[key]["main"](*args)
        outs = out if isinstance(out, (list, tuple)) or type(out).__name__ == "Array" else [out]
        return {n: torch.from_numpy(np.asarray(o.numpy())).to(self.device) for n, o in zip(self.output_names, outs)}

    def synchronize(self) -> None:
        self.dev.sync()

    def _save_files(self, directory: Path) -> list[Path]:
        files = []
        for s, lib in self.libs.items():
            path = directory / (f"model-{s}.so" if s is not None else "model.so")
            lib.export_library(str(path))
            files.append(path)
        return files

    def _extra_meta(self) -> dict[str, Any]:
        return {"axes": self.info["axes"]}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.info}


class TvmBackend(Backend):
    name = "tvm"
    precisions = (Precision.FP32, Precision.FP16)
    options_type = TvmOptions

    def _check(self, device: str) -> Availability:
        try:
            import tvm
        except ImportError as e:
            return Availability.no(f"apache-tvm is not installed (pip install -e '.[tvm]'): {e}")

        if device.startswith("cuda") and not tvm.cuda().exist:
            return Availability.no("this TVM runtime sees no CUDA device")
        return Availability.yes()

    def supports(self, precision: Precision, device: str) -> Availability:
        if precision == Precision.BF16:
            return Availability.no("TVM 0.27's ToMixedPrecision makes fp16 only (bf16 fails in layer_norm)")
        return super().supports(precision, device)

    def _compile(self, captured: Captured, precision: Precision, device: str, options: Any, shapes: list[Shape]) -> CompiledModel:
        import tvm

        target = target_for(device, options.arch)
        t0 = time.monotonic()
        imported = import_program(captured)
        info: dict[str, Any] = {"target": str(target), "library_dispatch": "none in this wheel", "fast_math": options.fast_math,
                                "axes": {n: list(s.dims) for n, s in captured.bundle.inputs.items()}}
        tuned = not device.startswith("cuda") and options.trials_per_task > 0
        if not tuned:
            mod = lower(imported, target, precision, options.fast_math)
            info["kernels_after_fusion"] = kernels(mod)
            info.update(shapes="dynamic", schedules="dlight defaults" if device.startswith("cuda") else "none (untuned)")
            if not device.startswith("cuda"):
                info["warning"] = UNTUNED
            libs: dict[Shape | None, Any] = {None: tvm.compile(mod, target=target)}
        else:
            if not shapes:
                raise BackendError("a tuned TVM build needs the shapes to tune for (MetaSchedule tunes static shapes)")
            dims = {n: s.dims for n, s in captured.bundle.inputs.items()}
            libs, info["tuning"], info["kernels_after_fusion"] = {}, {}, {}
            for s in shapes:
                # Shapes are fixed before lowering, so the mask and position arithmetic folds away
                # and every kernel is static (MetaSchedule mis-handles symbolic kernels).
                static = lower(bind_shape(imported, s, dims), target, precision, options.fast_math)
                info["kernels_after_fusion"][str(s)] = kernels(static)
                work = captured.cache_dir / "tvm" / f"{captured.graph_hash}-{precision.value}-{target.attrs['mcpu']}-{s}"
                info["tuning"][str(s)] = tune(static, target, work, options.trials_per_task, time.monotonic() + options.budget_s)
                libs[s] = tvm.compile(apply_database(static, target, work), target=target)
            info.update(shapes=[str(s) for s in shapes], schedules=f"MetaSchedule, {options.trials_per_task} trials/kernel, "
                        f"budget {options.budget_s:.0f}s per shape",
                        note=f"static shapes {', '.join(map(str, shapes))} (MetaSchedule tunes static shapes; other shapes are refused)")
            cut = [k for k, t in info["tuning"].items() if t.get("hit_budget")]
            if cut:
                info["warning"] = f"tuning budget ({options.budget_s:.0f}s) ran out at {', '.join(cut)}: some kernels are untuned"
        info["tvm_build_s"] = round(time.monotonic() - t0, 1)
        bundle = captured.bundle
        return TvmModel(libs, info, backend=self.name, precision=precision, device=device,
                        input_names=bundle.input_names, output_names=bundle.output_names, options=options)

    def _load(self, directory: Path, meta: dict[str, Any], device: str) -> CompiledModel:
        import tvm

        libs: dict[Shape | None, Any] = {}
        for name in meta["files"]:
            if name.endswith(".so"):
                key = None if name == "model.so" else Shape.parse(name.removeprefix("model-").removesuffix(".so"))
                libs[key] = tvm.runtime.load_module(str(directory / name))
        axes = {n: list(d) for n, d in meta.get("axes", {}).items()}
        return TvmModel(libs, {"loaded_from": str(directory), "axes": axes}, backend=self.name, precision=Precision(meta["precision"]), device=device,
                        input_names=tuple(meta["inputs"]), output_names=tuple(meta["outputs"]),
                        options=TvmOptions.from_mapping(meta.get("options", {})))
