"""torch-tensorrt: torch_tensorrt.dynamo.compile on the captured program; torch_tensorrt.save for deployment.

Precision is explicit typing: the program captured at fp16/bf16 is compiled with
use_explicit_typing=True, so TensorRT keeps the graph's types (the strongly typed path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.capture import Captured
from pipeline.inputs import Shape
from pipeline.manifest import Manifest
from pipeline.precision import Precision

from ..base import Availability, Backend, CompiledModel, EngineSpec, Tensors, ok, refused
from .engine import library_check
from .profile import Profile, ProfileOptions, check_shapes, input_profile, profile_from_json, profile_shapes, profile_to_json

PROGRAM = "program.ep"


@dataclass(frozen=True)
class TorchTrtOptions(ProfileOptions):
    workspace_mb: int = 0                  # 0: TensorRT's default
    min_block_size: int = 5                # smallest subgraph given to TensorRT; smaller ones stay in torch


def trt_inputs(profile: Profile, dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
    import torch_tensorrt

    return {n: torch_tensorrt.Input(min_shape=mn, opt_shape=opt, max_shape=mx, dtype=dtypes[n]) for n, (mn, opt, mx) in profile.items()}


class TorchTrtModel(CompiledModel):
    options: TorchTrtOptions

    def __init__(self, spec: EngineSpec, module: Any, profile: Profile) -> None:
        super().__init__(spec)
        self.module, self.profile = module, profile

    def run(self, inputs: Tensors) -> Tensors:
        check_shapes(self.profile, {n: tuple(t.shape) for n, t in inputs.items()})
        with torch.no_grad():
            outs = self.module(**{n: t.to(self.device) for n, t in inputs.items()})
        return dict(zip(self.output_names, outs))

    def _save_files(self, directory: Path) -> list[Path]:
        import torch_tensorrt

        example = {n: torch.ones(mn, dtype=torch.int64, device=self.device) for n, (mn, _, _) in self.profile.items()}
        path = directory / PROGRAM
        torch_tensorrt.save(self.module, str(path), output_format="exported_program", arg_inputs=(), kwarg_inputs=example)
        return [path]

    def _extra_meta(self) -> dict[str, Any]:
        return {"profile": profile_to_json(self.profile)}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        names = [n for n, _ in getattr(self.module, "named_children", lambda: [])()]
        info["trt_engines"] = sum(1 for n in names if n.startswith("_run_on_acc"))
        info["torch_fallback_blocks"] = sum(1 for n in names if n.startswith("_run_on_gpu"))
        return info


class TorchTensorRTBackend(Backend):
    name = "torch-tensorrt"
    support = {Precision.FP32: ok(), Precision.FP16: ok(generates=False), Precision.BF16: ok(generates=False),
               **dict.fromkeys((Precision.INT8, Precision.INT8_DYNAMIC), refused(
                   "torch-tensorrt's int8 path takes programs quantized by NVIDIA ModelOpt (its Q/DQ wrappers), "
                   "not PT2E's quantize/dequantize ops: use tensorrt, which builds int8 from the Q/DQ ONNX graph"))}
    devices = ("cuda",)
    runs_on = "TensorRT runs on CUDA devices"
    options_type = TorchTrtOptions
    requires = {"torch": "exact", "torch-tensorrt": "exact"}  # the program embeds engines of that build

    def _check(self, device: str) -> Availability:
        return library_check("torch_tensorrt")

    def _compile(self, captured: Captured, spec: EngineSpec, shapes: list[Shape]) -> CompiledModel:
        import torch_tensorrt
        from torch.export.passes import move_to_device_pass

        options: TorchTrtOptions = spec.options  # type: ignore[assignment]
        bundle = captured.bundle
        profile = input_profile(bundle, profile_shapes(bundle, shapes, options))
        program = move_to_device_pass(captured.program_at(spec.precision), spec.device)
        kwargs: dict[str, Any] = {"min_block_size": options.min_block_size, "use_explicit_typing": True}
        if options.optimization_level is not None:
            kwargs["optimization_level"] = options.optimization_level
        if options.workspace_mb:
            kwargs["workspace_size"] = options.workspace_mb << 20
        module = torch_tensorrt.dynamo.compile(program, arg_inputs=(), kwarg_inputs=trt_inputs(profile, {n: s.dtype for n, s in bundle.inputs.items()}),
                                               device=torch.device(spec.device), **kwargs)
        return TorchTrtModel(spec, module, profile)

    def _load(self, directory: Path, spec: EngineSpec, manifest: Manifest) -> CompiledModel:
        import torch_tensorrt

        module = torch_tensorrt.load(str(directory / PROGRAM)).module()
        return TorchTrtModel(spec, module, profile_from_json(manifest.engine["profile"]))
