"""The `tensorrt` backend: ONNX from the captured program through the TensorRT builder, run with
execute_async_v3 on torch's CUDA tensors, saved as a serialized `.engine`."""

from __future__ import annotations

import importlib
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch

from pipeline.capture import Captured
from pipeline.errors import ArtifactError, BackendError, ShapeError
from pipeline.fsutil import cache_entry, cached_dir, lock
from pipeline.inputs import Shape
from pipeline.manifest import Manifest
from pipeline.precision import Precision

from ..base import Availability, Backend, CompiledModel, EngineSpec, Tensors, ok, refused
from ..quantize import qdq_onnx_cached
from .builder import TrtOptions, build_engine, logger
from .profile import Profile, check_shapes, input_profile, max_batch, profile_from_json, profile_shapes, profile_to_json

ENGINE_FILE = "model.engine"

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


def torch_dtype(trt_dtype_name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[trt_dtype_name]
    except KeyError:
        raise BackendError(f"engine tensor of TensorRT type {trt_dtype_name} has no torch equivalent") from None


def engine_facts(profile: Profile, trt_version: str, gpu: dict[str, Any]) -> dict[str, Any]:
    """What a serialized engine is tied to, for the manifest's engine section."""
    return {"tensorrt": trt_version, "gpu": gpu, "profile": profile_to_json(profile)}


def check_engine_facts(engine: Mapping[str, Any], trt_version: str, gpu: dict[str, Any]) -> Profile:
    """The engine's profile, after checking it was built by this TensorRT for this GPU: a serialized
    engine is tied to both, and deserializing a foreign one fails or misbehaves."""
    if "profile" not in engine:
        raise ArtifactError("the manifest's engine section has no TensorRT profile: not a Kiln TensorRT engine")
    if engine.get("tensorrt") != trt_version:
        raise ArtifactError(f"engine built with TensorRT {engine.get('tensorrt')}, this is TensorRT {trt_version}: rebuild it")
    if engine.get("gpu", {}).get("capability") != gpu.get("capability"):
        raise ArtifactError(f"engine built for {engine.get('gpu', {}).get('capability')}, this GPU is {gpu.get('capability')}: rebuild it")
    return profile_from_json(engine["profile"])


def gpu_of(device: str) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"sm_{props.major}{props.minor}"}


def library_check(module: str) -> Availability:
    """The library itself, not only its type stubs."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        return Availability.no(f"{module} is not installed ({type(e).__name__}: {e})")
    if getattr(mod, "__file__", None) is None:  # tensorrt-stubs alone makes an empty namespace package
        return Availability.no(f"the {module} package here is type stubs only, not the library")
    return Availability.yes()


class TrtModel(CompiledModel):
    options: TrtOptions

    def __init__(self, spec: EngineSpec, engine_bytes: bytes, profile: Profile) -> None:
        super().__init__(spec)
        import tensorrt as trt

        self.engine_bytes, self.profile = engine_bytes, profile
        self.runtime = trt.Runtime(logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise ArtifactError("TensorRT could not deserialize the engine (corrupted, or built by another version)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(self, inputs: Tensors) -> Tensors:
        check_shapes(self.profile, {n: tuple(t.shape) for n, t in inputs.items()})
        keep = []
        for name, t in inputs.items():
            t = t.to(self.device).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ShapeError(f"TensorRT refused shape {tuple(t.shape)} for input {name!r}")
            self.context.set_tensor_address(name, t.data_ptr())
        outs: Tensors = {}
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            out = torch.empty(shape, dtype=torch_dtype(self.engine.get_tensor_dtype(name).name), device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs[name] = out
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("TensorRT execute_async_v3 failed")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outs

    def synchronize(self) -> None:
        self.stream.synchronize()

    def _save_files(self, directory: Path) -> list[Path]:
        (directory / ENGINE_FILE).write_bytes(self.engine_bytes)
        return [directory / ENGINE_FILE]

    def _extra_meta(self) -> dict[str, Any]:
        import tensorrt as trt

        return engine_facts(self.profile, trt.__version__, gpu_of(self.device))

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(profile=profile_to_json(self.profile), engine_mb=round(len(self.engine_bytes) / 2**20, 1),
                    layers=self.engine.num_layers, strongly_typed=self.options.strongly_typed)
        return info


class TensorRTBackend(Backend):
    name = "tensorrt"
    support = {Precision.FP32: ok(), Precision.FP16: ok(), Precision.BF16: ok(), Precision.INT8: ok(generates=False),
               Precision.INT8_DYNAMIC: refused("TensorRT quantizes int8 activations with scales fixed at build (explicit Q/DQ); "
                                            "its run-time quantization is for FP8/FP4 only: use int8")}
    devices = ("cuda",)
    runs_on = "TensorRT runs on CUDA devices"
    options_type = TrtOptions
    requires = {"tensorrt": "exact"}  # a serialized engine loads only in the TensorRT that built it
    serving_platform = "tensorrt_plan"
    serving_files = {ENGINE_FILE: "model.plan"}

    def _check(self, device: str) -> Availability:
        return library_check("tensorrt")

    def _compile(self, captured: Captured, spec: EngineSpec, shapes: list[Shape]) -> CompiledModel:
        import tensorrt as trt

        options: TrtOptions = spec.options  # type: ignore[assignment]
        profile = input_profile(captured.bundle, profile_shapes(captured.bundle, shapes, options))
        gpu = gpu_of(spec.device)
        if spec.precision == Precision.INT8:
            onnx = qdq_onnx_cached(captured, symmetric=True)  # TensorRT takes symmetric int8 Q/DQ only
        else:
            onnx = captured.onnx_path(spec.precision if options.strongly_typed else Precision.FP32)
        tied = {"tensorrt": trt.__version__, "gpu": gpu["capability"]}
        final = cache_entry(captured.cache_dir, "tensorrt", f"{captured.graph_hash}-{spec.precision.value}",
                            {**tied, "options": options.build_options(), "profile": profile, "onnx": onnx.parent.name})
        timing = cache_entry(captured.cache_dir, "tensorrt", "timing", tied) / "timing.cache"

        def make(tmp: Path) -> None:
            with lock(timing):  # one timing cache per TensorRT and GPU, read and rewritten by each build
                (tmp / ENGINE_FILE).write_bytes(build_engine(onnx, profile, spec.precision, options,
                                                             timing if options.timing_cache else None))

        cached_dir(final, make)
        return TrtModel(spec, (final / ENGINE_FILE).read_bytes(), profile)

    def _load(self, directory: Path, spec: EngineSpec, manifest: Manifest) -> CompiledModel:
        import tensorrt as trt

        profile = check_engine_facts(manifest.engine, trt.__version__, gpu_of(spec.device))
        return TrtModel(spec, (directory / ENGINE_FILE).read_bytes(), profile)

    def _max_batch(self, manifest: Manifest) -> int | None:
        return max_batch(profile_from_json(manifest.engine["profile"]))
