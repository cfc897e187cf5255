"""torch.compile with Inductor; AOTInductor packages (.pt2) for deployment."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import torch

from pipeline.capture import Captured
from pipeline.errors import BackendError
from pipeline.inputs import Shape
from pipeline.precision import Precision

from pipeline.manifest import Manifest

from .base import Availability, Backend, BackendOptions, CompiledModel, EngineSpec, Tensors, cpu_only, ok
from .quantize import PT2E_CPU_ONLY, quantized_program

Mode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass(frozen=True)
class InductorOptions(BackendOptions):
    mode: Mode = "default"
    # Weights folded into the graph as constants, so Inductor can fold and pre-pack them for its CPU
    # matrix products; what that buys differs between hosts (docs/benchmarks.md).
    freezing: bool = True
    # None: specialize on the first shape, recompile dynamic on a new one (torch's default).
    dynamic: bool | None = None


def _inductor_options(options: InductorOptions) -> dict[str, Any]:
    """torch.compile takes mode or options, not both: spell the mode out as options and add ours."""
    mode_opts = {} if options.mode == "default" else dict(torch._inductor.list_mode_options(options.mode))
    return {**mode_opts, "freezing": options.freezing}


def _frozen(compiled: Callable[..., Any], freezing: bool) -> Callable[..., Any]:
    """Calls `compiled` under Inductor's global freezing flag. Inductor decides whether weights are
    constants (folded, and pre-packed for oneDNN's and MKL's matrix products) from that flag when it
    compiles, lazily, at a call; the `freezing` option given to torch.compile does not reach the
    decision (tests/test_inductor.py reads the generated code). Set and restored by hand: this is
    every call's path, and `config.patch` costs about 100 us a call where this costs about 6."""
    config = torch._inductor.config

    def fn(**inputs: torch.Tensor) -> Any:
        before = config.freezing
        config.freezing = freezing
        try:
            return compiled(**inputs)
        finally:
            config.freezing = before

    return fn


class InductorModel(CompiledModel):
    options: InductorOptions

    def __init__(self, spec: EngineSpec, fn: Any, program: torch.export.ExportedProgram | None, package: Path | None,
                 capture: Callable[[], torch.export.ExportedProgram] | None = None) -> None:
        super().__init__(spec)
        self.fn, self.program, self.package, self._capture = fn, program, package, capture
        from torch._inductor import metrics
        self._metrics = (metrics.ir_nodes_pre_fusion, metrics.generated_kernel_count)

    def run(self, inputs: Tensors) -> Tensors:
        with torch.no_grad():
            outs = self.fn(**inputs)
        return dict(zip(self.output_names, outs))

    def _save_files(self, directory: Path) -> list[Path]:
        """AOTInductor: a .pt2 package that reloads with torch._inductor.aoti_load_package, no Python model code."""
        if self.program is None and self._capture is not None:
            self.program = self._capture()
        if self.program is None:
            raise NotImplementedError("this engine was loaded from a package; save the original")
        path = directory / "model.pt2"
        program = self.program
        if self.device != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, self.device)
        t0 = time.perf_counter()
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs={"freezing": self.options.freezing})
        self.aoti_build_s = time.perf_counter() - t0
        return [path]

    def engine_label(self) -> str:
        return "model.pt2 (AOTInductor package)" if self.package is not None else "torch.compile (in memory)"

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["mode"] = self.options.mode if self.package is None else "aotinductor"
        info["freezing"] = self.options.freezing
        if hasattr(self, "aoti_build_s"):
            info["aoti_build_s"] = round(self.aoti_build_s, 2)
        if self.package is None:
            # Inductor compiles lazily, once per shape: count what it generated since this engine was made
            # (an FX-graph cache hit generates none).
            from torch._inductor import metrics
            info["ir_nodes_pre_fusion"] = metrics.ir_nodes_pre_fusion - self._metrics[0]
            info["kernels_generated"] = metrics.generated_kernel_count - self._metrics[1]
        return info


class InductorBackend(Backend):
    name = "inductor"
    support = {Precision.FP32: ok(), Precision.FP16: ok(), Precision.BF16: ok(),
               Precision.INT8: cpu_only(PT2E_CPU_ONLY, generates=False), Precision.INT8_DYNAMIC: cpu_only(PT2E_CPU_ONLY)}
    options_type = InductorOptions
    requires = {"torch": "exact"}  # an AOTInductor package is compiled code for one torch build

    def _check(self, device: str) -> Availability:
        import shutil

        if device == "cpu" and not (shutil.which("gcc") or shutil.which("cc") or shutil.which("g++")):
            return Availability.no("Inductor's CPU code generation needs a C++ compiler (gcc) on the PATH")
        return Availability.yes()

    def _compile(self, captured: Captured, spec: EngineSpec, shapes: list[Shape]) -> CompiledModel:
        options: InductorOptions = spec.options  # type: ignore[assignment]
        if spec.precision.quantized:
            # PT2E's int8 linears become oneDNN qlinear kernels only through Inductor's freezing pass.
            if not options.freezing:
                raise BackendError("Inductor int8 needs freezing=true: its int8 linears are pre-packed as constants")
            from .quantize import pt2e

            quantized = pt2e(captured, spec.precision)
            # Compiled as converted; captured again only for an AOTInductor package.
            compiled = torch.compile(quantized, dynamic=options.dynamic, options=_inductor_options(options))
            return InductorModel(spec, _frozen(compiled, True), None, None, quantized_program(captured, quantized))
        program = captured.program_at(spec.precision)
        compiled = torch.compile(program.module().to(spec.device), dynamic=options.dynamic, options=_inductor_options(options))
        return InductorModel(spec, _frozen(compiled, options.freezing), program, None)

    def step_options(self, options: BackendOptions, step: Literal["prefill", "decode"]) -> BackendOptions:
        """The decode step specialized per batch (static shapes: its kernels are the one-token step's own)."""
        opts: InductorOptions = options  # type: ignore[assignment]
        return dataclasses.replace(opts, dynamic=False) if step == "decode" else opts

    def _load(self, directory: Path, spec: EngineSpec, manifest: Manifest) -> CompiledModel:
        path = directory / "model.pt2"
        return InductorModel(spec, torch._inductor.aoti_load_package(str(path)), None, path)
