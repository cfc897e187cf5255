"""From the captured program to a lowered Relax module: the target, the import, the pass list."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.capture import Captured
from pipeline.errors import BackendError
from pipeline.inputs import Shape
from pipeline.precision import Precision

from .engine import cpu_threads


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
    """GELU as 0.5*x*(1+fast_erf(x/sqrt2)): TVM's own legalization calls the scalar erff per element,
    which does not vectorize; plain topi.erf fails LLVM codegen ("unknown intrinsic tirx.erf")."""
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
        mod = from_exported_program(captured.program, unwrap_unit_return_tuple=True)
    except Exception as e:
        raise BackendError(f"TVM could not import the program: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return drop_upper_bounds(mod)


def drop_upper_bounds(mod: Any) -> Any:
    """The importer records each dynamic axis's upper bound, and Relax's memory planner then sizes
    every buffer for it up front: a decoder's [batch, 1, seq, seq] mask at Qwen2's 32768
    positions is tens of GB (std::bad_alloc). Without the bound, buffers of dynamic size are
    allocated when the call knows its shape; static shapes (the tuned path) are unaffected."""
    main = mod["main"]
    if main.attrs is not None and "tir_var_upper_bound" in main.attrs:
        mod["main"] = main.without_attr("tir_var_upper_bound")
    return mod


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
        mod = tvm.transform.Sequential(passes)(mod)
    return _no_gather_prepack(mod) if prepack else mod


_OPAQUE = 8  # relax's OpPatternKind kOpaque: what AnnotateTIROpPattern gives a gather (take)


def _no_gather_prepack(mod: Any) -> Any:
    """A table read at data-dependent rows (an embedding's `take`) keeps its layout: MetaSchedule
    rewrote GPT-2's embedding tables for the one-token decode step into a 64-element buffer
    indexed by `id % 2` (its layout rewrite takes the gather's index for an affine one), and
    the tuned step computed wrong keys from the first layer on. Untuned, the same static module is exact."""
    import tvm

    for gv, func in list(mod.functions.items()):
        if (isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and "layout_free_buffers" in func.attrs
                and int(func.attrs.get("op_pattern", 0)) >= _OPAQUE):
            mod[gv] = func.without_attr("layout_free_buffers")
    return mod


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


def cuda_library(captured: Captured, arch: str, precision: Precision = Precision.FP32) -> tuple[Any, int]:
    """A CUDA build with dlight's default schedules, made without a GPU: the library carries CUDA
    source that the TVM runtime compiles when it loads (NVRTC or nvcc where it runs)."""
    import tvm

    target = target_for("cuda", arch)
    mod = lower(import_program(captured), target, precision, fast_math=False)
    return tvm.compile(mod, target=target), kernels(mod)
