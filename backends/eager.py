"""Eager PyTorch: the reference in fp32, a peer row in fp16/bf16, and in int8 the PT2E-quantized
program run op by op: the int8 reference every int8 engine is also compared against."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.capture import Captured
from pipeline.env import quiet_import
from pipeline.errors import BackendError
from pipeline.inputs import Shape
from pipeline.precision import Precision

from pipeline.manifest import Manifest

from .base import Backend, BackendOptions, CompiledModel, EngineSpec, Tensors, cpu_only, ok
from .quantize import PT2E_CPU_ONLY, quantized_program


@dataclass(frozen=True)
class EagerOptions(BackendOptions):
    pass


class EagerModel(CompiledModel):
    def __init__(self, spec: EngineSpec, module: nn.Module, program: torch.export.ExportedProgram | None,
                 capture: Callable[[], torch.export.ExportedProgram] | None = None) -> None:
        super().__init__(spec)
        self.module, self.program, self._capture = module, program, capture

    def run(self, inputs: Tensors) -> Tensors:
        with torch.no_grad():
            outs = self.module(**inputs)
        return dict(zip(self.output_names, outs))

    def _save_files(self, directory: Path) -> list[Path]:
        # The deployable form of eager is the captured program itself (torch.export archive).
        if self.program is None and self._capture is not None:  # int8: the quantized module, captured when saved
            self.program = self._capture()
        if self.program is None:
            raise NotImplementedError("this eager model was loaded from an archive; save the original")
        path = directory / "program.pt2"
        torch.export.save(self.program, str(path))
        return [path]

    def engine_label(self) -> str:
        return "program.pt2 (torch.export archive)" if self.loaded_from else "the nn.Module"

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.program is not None:
            info["graph_ops"] = sum(1 for n in self.program.graph.nodes if n.op == "call_function")
        info["kernels"] = "op by op (no fusion)"
        return info


class EagerBackend(Backend):
    name = "eager"
    support = {Precision.FP32: ok(), Precision.FP16: ok(), Precision.BF16: ok(),
               Precision.INT8: cpu_only(PT2E_CPU_ONLY, generates=False), Precision.INT8_DYNAMIC: cpu_only(PT2E_CPU_ONLY)}
    options_type = EagerOptions

    def _compile(self, captured: Captured, spec: EngineSpec, shapes: list[Shape]) -> CompiledModel:
        if spec.precision.quantized:
            from .quantize import pt2e

            quantized = pt2e(captured, spec.precision)
            return EagerModel(spec, quantized, None, quantized_program(captured, quantized))
        module = captured.bundle.module
        if spec.precision != Precision.FP32 or spec.device != "cpu":
            module = copy.deepcopy(module).to(device=spec.device, dtype=spec.precision.dtype)
        return EagerModel(spec, module.eval(), captured.program_at(spec.precision))

    def _load(self, directory: Path, spec: EngineSpec, manifest: Manifest) -> CompiledModel:
        # the program's quantize/dequantize ops are torchao's, registered when it is imported
        if spec.precision.quantized and not quiet_import("torchao.quantization.pt2e.quantize_pt2e"):
            raise BackendError(f"{directory} is an int8 program: loading it needs torchao (pip install torchao)")
        program = torch.export.load(str(directory / "program.pt2"))
        return EagerModel(spec, program.module().to(spec.device), program)
