"""Apache TVM (Relax): the captured program through from_exported_program, operator fusion,
MetaSchedule tuning under a time budget with a reused database, and export_library.

On the CPU an untuned build is ~70x slower than eager on MiniLM (measured: README), so tuning
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

UNTUNED = "untuned TVM build (tvm.trials_per_task=0): expect it far slower than eager (MiniLM 1x128 on 2 CPU cores: ~70x)"


@dataclass(frozen=True)
class TvmOptions(BackendOptions):
    trials_per_task: int = 64    # MetaSchedule trials per kernel at most (CPU); 0: no tuning (dynamic shapes, warned)
    budget_s: float = 600.0      # wall-clock cap on tuning each static shape
    fast_math: bool = True       # GELU as 0.5x(1+fast_erf(x/sqrt2)) and FastMathTransform: vectorized erf/exp/tanh
    arch: str | None = None      # CUDA arch (sm_90); default: the device's


def cpu_threads() -> int:
    """Sets up TVM's CPU thread pool before anything of TVM runs (it reads the environment once,
    at its first parallel call; MetaSchedule's runner workers inherit it) and returns its threads.
    - TVM_NUM_THREADS: torch's thread count unless set. TVM's own default on x86 is half the
      logical CPUs (it assumes hyper-threading): one thread on this 2-vCPU machine kind, which
      measured MiniLM 1x128 at 30.9 ms against 15.5 ms with two.
    - TVM_THREAD_POOL_SPIN_COUNT: 10000 unless set. With TVM's default a worker spins
      ~170 ms of CPU after every call (measured), taking a core from whatever runs next: eager
      timed after TVM went from 25.8 to 28.8 ms, while TVM itself was no faster (16.6 vs 16.3 ms)."""
    import os

    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "10000")
    return int(os.environ["TVM_NUM_THREADS"])


def target_for(device: str, arch: str | None = None) -> Any:
    import tvm

    if device.startswith("cuda"):
        if arch is None:
            props = torch.cuda.get_device_properties(device)
            arch = f"sm_{props.major}{props.minor}"
        return tvm.target.Target({"kind": "cuda", "arch": arch})  # Target("cuda") alone means sm_50
    # "llvm -mcpu=native" is refused and a bare "llvm" builds generic x86: name the host CPU.
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": cpu_threads()})


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


def lower(mod: Any, target: Any, precision: Precision, fast_math: bool, prepack: bool = False) -> Any:
    """Legalize, fold, fuse: the Relax pipeline up to where schedules apply. With prepack, weights
    (relax constants here) are marked layout-free so MetaSchedule may choose a packed layout for them."""
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
    if prepack:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
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


def check_budget(deadline: float, task_id: int, measured: int, n_tasks: int) -> None:
    """Past the deadline, stop, but only once every task has been measured at least once: a kernel
    with no record keeps no schedule at all (naive loops, ~100x slower), far worse than a short overrun."""
    if time.monotonic() > deadline and measured >= n_tasks:
        raise BudgetSpent(f"tuning budget spent at task {task_id}")


def _budget_callback(deadline: float) -> Any:
    """Stops tuning once the deadline has passed. It runs after AddToDatabase, so every measured
    batch is already in the JSON database (which writes each record as it comes). Raising is the
    stop MetaSchedule honours at once; terminating tasks from a callback races its own clean-up,
    which then terminates a finished task a second time and fails."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    measured: set[int] = set()

    @derived_object
    class Budget(PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, *args: Any) -> None:
            measured.add(task_id)
            check_budget(deadline, task_id, len(measured), len(task_scheduler.tasks_))

    return Budget()


def build_candidate(mod: Any, target: Any) -> str:
    """One MetaSchedule candidate compiled and packed for the runner: MetaSchedule's default_build
    without its `import tvm.s_tir.tensor_intrin`, which registers the CUDA/ROCm/ARM intrinsics and
    takes ~21 s (measured), paid by every fresh builder worker, so ~27 s per builder batch of any
    size. An fp32 CPU candidate arrives already scheduled and never names those intrinsics."""
    import tempfile

    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    rt = tvm.driver.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)
    path = str(Path(tempfile.mkdtemp(prefix="kiln-ms-")) / f"candidate.{tar.output_format}")
    rt.export_library(path, fcompile=tar)
    return path


def _in_process_builder() -> Any:
    """Builds candidates in this process (~0.05 s each) instead of a fresh worker pool per batch."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for bi in build_inputs:
                try:
                    results.append(BuilderResult(build_candidate(bi.mod, bi.target), None))
                except Exception as e:  # a candidate that fails to build is a measured failure, not a crash
                    results.append(BuilderResult(None, f"{type(e).__name__}: {e}"))
            return results

    return InProcessBuilder()


def _import_tensor_intrin() -> None:
    """MetaSchedule's TuneContext imports tvm.s_tir.tensor_intrin, whose ~250 TVMScript intrinsics
    each call inspect.stack(); with the source lines that reads (context=1), every frame's module
    lookup scans sys.modules, and with torch and transformers loaded that import took 52 s of a
    Kiln run (21 s in a bare process). The parser reads only frame locals and, for class-scope
    detection, a code line it treats as absent when None: context=0 registers the same 83 x86/CUDA
    intrinsics (checked by hashing their scripts) in ~14 s."""
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    stack = inspect.stack
    inspect.stack = lambda context=1: stack(0)  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = stack


def tune(mod: Any, target: Any, work_dir: Path, trials_per_task: int, budget_s: float) -> dict[str, Any]:
    """MetaSchedule into work_dir's JSON database. A database that already got these trials, or was
    cut short by at least this budget, is reused as is; otherwise tuning resumes from its records."""
    from tvm.s_tir import meta_schedule as ms

    marker = work_dir / "kiln-tuned.json"
    records = work_dir / "database_tuning_record.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        enough = (done.get("budget_s", 0) >= budget_s) if done.get("hit_budget") else (done.get("trials_per_task", 0) >= trials_per_task)
        if enough:
            return {**done, "reused": True}
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _import_tensor_intrin()
    n_tasks = len(ms.relax_integration.extract_tasks(mod, target))
    callbacks = [*ms.MeasureCallback.create("default"), _budget_callback(t0 + budget_s)]
    cut = False
    try:
        # The gradient scheduler measures every task once, then gives each round of trials to the
        # task whose weighted latency is falling fastest: the matrix products, not the reshapes.
        ms.relax_integration.tune_relax(mod, {}, target, str(work_dir), max_trials_global=trials_per_task * n_tasks,
                                        max_trials_per_task=trials_per_task, num_trials_per_iter=min(16, trials_per_task),
                                        measure_callbacks=callbacks, seed=0, builder=_in_process_builder(),
                                        task_scheduler="gradient")
    except Exception as e:  # the FFI hands BudgetSpent back wrapped in its own error type
        if "tuning budget spent" not in str(e):
            raise
        cut = True
    measured = len(records.read_text().splitlines()) if records.is_file() else 0
    info = {"trials_per_task": trials_per_task, "budget_s": budget_s, "tasks": n_tasks, "trials_measured": measured,
            "seconds": round(time.monotonic() - t0, 1), "hit_budget": cut}
    marker.write_text(json.dumps(info))
    return {**info, "reused": False}


def apply_database(mod: Any, target: Any, work_dir: Path) -> tuple[Any, list[str]]:
    """The tuned schedules applied; weights whose layout a schedule rewrote are repacked once, at
    build time (the rewrite is split out and folded over the constant weights). Also returns the
    kernels that found no schedule in the database (they run as generated: naive loops)."""
    import tvm
    from tvm import relax

    with target:
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
        unscheduled = sorted(str(g.name_hint) for g, f in mod.functions.items()
                             if isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.is_scheduled", False))
        mod = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant()])(mod)
    return mod, unscheduled


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
        if not self.device.startswith("cuda"):
            self.info["threads"] = cpu_threads()  # before the VM first runs: TVM reads it once
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
        # a process that loads the .so without Kiln should set TVM_NUM_THREADS to this (see cpu_threads)
        return {"axes": self.info["axes"], **({"threads": self.info["threads"]} if "threads" in self.info else {})}

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
        import tvm_ffi

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
            unscheduled: dict[str, list[str]] = {}
            for s in shapes:
                # Shapes are fixed before lowering, so the mask and position arithmetic folds away
                # and every kernel is static (MetaSchedule mis-handles symbolic kernels).
                static = lower(bind_shape(imported, s, dims), target, precision, options.fast_math, prepack=True)
                info["kernels_after_fusion"][str(s)] = kernels(static)
                # keyed by the lowered module itself, so any change to the graph, the pipeline or
                # TVM gets its own database rather than one whose records no longer match
                key = f"{tvm_ffi.structural_hash(static, skip_tensor_content=True) & (2**64 - 1):016x}"  # weights: graph_hash
                cpu = f"{target.attrs['mcpu']}x{target.attrs['num-cores']}"  # measured with that many threads
                work = captured.cache_dir / "tvm" / f"{captured.graph_hash}-{precision.value}-{cpu}-{s}-{key}"
                info["tuning"][str(s)] = tune(static, target, work, options.trials_per_task, options.budget_s)
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
