"""TensorRT engines from ONNX: the ONNX parser, optimization profiles from the dynamic axes,
fp16/bf16 (builder flags, or a strongly typed network), a persisted timing cache.

Written against the TensorRT 10 Python API and type-checked with tensorrt-stubs; the library
is not installable on Kiln's machines, so every part that does not need it (profiles, options,
precision flags, the engine manifest, shape checks, error mapping) is plain Python, tested here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.capture import Captured
from pipeline.errors import ArtifactError, BackendError, InputError, ShapeError
from pipeline.inputs import Shape
from pipeline.models import ModelBundle
from pipeline.precision import Precision
from pipeline.report import staged_dir

from .base import Availability, Backend, BackendOptions, CompiledModel, Tensors

ENGINE_FILE, PROFILE_FILE = "model.engine", "trt.json"
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)


@dataclass(frozen=True)
class ProfileOptions(BackendOptions):
    """Options shared by both TensorRT backends: profile bounds and the builder optimization level."""

    optimization_level: int | None = None  # builder_optimization_level, 0..5; None: TensorRT's default (3)
    # Profile bounds as BATCHxSEQ; unset ones come from the run's shapes (min, largest, max).
    profile_min: str | None = None
    profile_opt: str | None = None
    profile_max: str | None = None

    def __post_init__(self) -> None:
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise InputError(f"optimization_level {self.optimization_level} is outside 0..5")
        for value in (self.profile_min, self.profile_opt, self.profile_max):
            if value is not None:
                Shape.parse(value)


@dataclass(frozen=True)
class TrtOptions(ProfileOptions):
    workspace_mb: int = 4096           # IBuilderConfig memory pool limit for WORKSPACE
    # False: fp16/bf16 by builder flags (TensorRT picks per layer). True: a strongly typed network
    # built from ONNX exported at that precision; types are the graph's, no precision flags.
    strongly_typed: bool = False
    timing_cache: bool = True          # persisted under the cache dir, reused by later builds

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.workspace_mb < 1:
            raise InputError(f"workspace_mb must be positive, got {self.workspace_mb}")


def profile_shapes(bundle: ModelBundle, shapes: Sequence[Shape], options: ProfileOptions) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) over batch and seq: the user's bounds where given, else the run's shapes
    (elementwise min, the largest, elementwise max), else the model's whole range with opt 1x128."""
    ranges = bundle.axis_ranges
    lo_b, hi_b = ranges.get("batch", (1, 1))
    lo_s, hi_s = ranges.get("seq", (1, 1))
    if shapes:
        auto = (Shape(min(s.batch for s in shapes), min(s.seq for s in shapes)), max(shapes, key=lambda s: s.batch * s.seq),
                Shape(max(s.batch for s in shapes), max(s.seq for s in shapes)))
    else:
        auto = (Shape(lo_b, lo_s), Shape(min(max(1, lo_b), hi_b), min(max(128, lo_s), hi_s)), Shape(hi_b, hi_s))
    chosen = tuple(Shape.parse(v) if v else a for v, a in zip((options.profile_min, options.profile_opt, options.profile_max), auto))
    mn, opt, mx = chosen
    if not (mn.batch <= opt.batch <= mx.batch and mn.seq <= opt.seq <= mx.seq):
        raise ShapeError(f"profile must satisfy min <= opt <= max per axis; got min {mn}, opt {opt}, max {mx}")
    if mn.batch < lo_b or mx.batch > hi_b or mn.seq < lo_s or mx.seq > hi_s:
        raise ShapeError(f"profile {mn}..{mx} leaves {bundle.name}'s range batch [{lo_b}, {hi_b}], seq [{lo_s}, {hi_s}]")
    return mn, opt, mx


def input_profile(bundle: ModelBundle, bounds: tuple[Shape, Shape, Shape]) -> Profile:
    """Per input, the (min, opt, max) dims TensorRT's IOptimizationProfile.set_shape takes."""
    out: Profile = {}
    for name, spec in bundle.inputs.items():
        dims = [tuple(getattr(b, d) if isinstance(d, str) and d in ("batch", "seq") else (1 if isinstance(d, str) else d)
                      for d in spec.dims) for b in bounds]
        out[name] = (dims[0], dims[1], dims[2])
    return out


def check_shapes(profile: Profile, inputs: dict[str, tuple[int, ...]]) -> None:
    """Refuses, before TensorRT sees it, an input shape outside the engine's profile."""
    for name, shape in inputs.items():
        if name not in profile:
            raise InputError(f"input {name!r} is not an engine input; inputs: {', '.join(profile)}")
        mn, _, mx = profile[name]
        if len(shape) != len(mn) or any(not lo <= s <= hi for s, lo, hi in zip(shape, mn, mx)):
            raise ShapeError(f"input {name!r} has shape {tuple(shape)}, outside the engine's profile "
                             f"{tuple(mn)}..{tuple(mx)}; rebuild with --option tensorrt.profile_max=BxS (or _min)")


def precision_flags(precision: Precision, strongly_typed: bool) -> tuple[list[str], list[str]]:
    """(network creation flags, builder flags) by name. A strongly typed network takes its types
    from the graph and refuses precision flags; a weakly typed one gets FP16 or BF16."""
    if strongly_typed:
        return ["STRONGLY_TYPED"], []
    return [], {Precision.FP32: [], Precision.FP16: ["FP16"], Precision.BF16: ["BF16"]}[precision]


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


def torch_dtype(trt_dtype_name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[trt_dtype_name]
    except KeyError:
        raise BackendError(f"engine tensor of TensorRT type {trt_dtype_name} has no torch equivalent") from None


def parser_errors(parser: Any) -> str:
    """The ONNX parser's errors as one message: node, operator, description."""
    msgs = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = f"node {e.node_name()} ({e.node_operator()}): " if hasattr(e, "node_name") and e.node_name() else ""
        msgs.append(node + e.desc())
    return "; ".join(msgs) or "no error reported"


def engine_manifest(profile: Profile, precision: Precision, options: TrtOptions, trt_version: str, device: dict[str, Any]) -> dict[str, Any]:
    return {"format": "kiln-tensorrt-engine", "version": 1, "tensorrt": trt_version, "device": device, "precision": precision.value,
            "options": options.to_dict(), "profile": {k: [list(d) for d in v] for k, v in profile.items()}}


def read_manifest(directory: Path, trt_version: str, device: dict[str, Any]) -> Profile:
    """The engine's profile, after checking it was built by this TensorRT for this GPU: a serialized
    engine is tied to both, and deserializing a foreign one fails or misbehaves."""
    try:
        meta = json.loads((directory / PROFILE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{directory} holds no readable {PROFILE_FILE}: {e}") from e
    if meta.get("format") != "kiln-tensorrt-engine":
        raise ArtifactError(f"{directory / PROFILE_FILE} is not a Kiln TensorRT engine manifest")
    if meta.get("tensorrt") != trt_version:
        raise ArtifactError(f"engine built with TensorRT {meta.get('tensorrt')}, this is TensorRT {trt_version}: rebuild it")
    if meta.get("device", {}).get("capability") != device.get("capability"):
        raise ArtifactError(f"engine built for {meta.get('device', {}).get('capability')}, this GPU is {device.get('capability')}: rebuild it")
    return {k: (tuple(v[0]), tuple(v[1]), tuple(v[2])) for k, v in meta["profile"].items()}


def _gpu(device: str) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"sm_{props.major}{props.minor}"}


def _logger(trt: Any) -> Any:
    class Collecting(trt.ILogger):  # keeps errors for the exception message, passes the rest to stderr
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            elif int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", flush=True)

    return Collecting()


def build_engine(onnx_path: Path, profile: Profile, precision: Precision, options: TrtOptions, timing_cache: Path | None) -> bytes:
    import tensorrt as trt

    logger = _logger(trt)
    builder = trt.Builder(logger)
    net_flags, builder_flags = precision_flags(precision, options.strongly_typed)
    flags = 0
    for name in net_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise BackendError(f"TensorRT's ONNX parser refused the model: {parser_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    for name in builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    opt_profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in profile.items():
        opt_profile.set_shape(name, trt.Dims(list(mn)), trt.Dims(list(opt)), trt.Dims(list(mx)))
    config.add_optimization_profile(opt_profile)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError("TensorRT could not build the engine: " + ("; ".join(logger.errors[-3:]) or "no error logged"))
    if cache is not None and timing_cache is not None:
        from pipeline.report import atomic_write

        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


class TrtModel(CompiledModel):
    options: TrtOptions

    def __init__(self, engine_bytes: bytes, profile: Profile, **kw: Any) -> None:
        super().__init__(**kw)
        import tensorrt as trt

        self.engine_bytes, self.profile = engine_bytes, profile
        self.runtime = trt.Runtime(_logger(trt))
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
        import tensorrt as trt

        (directory / ENGINE_FILE).write_bytes(self.engine_bytes)
        manifest = engine_manifest(self.profile, self.precision, self.options, trt.__version__, _gpu(self.device))
        (directory / PROFILE_FILE).write_text(json.dumps(manifest, indent=2))
        return [directory / ENGINE_FILE, directory / PROFILE_FILE]

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(profile={k: [list(d) for d in v] for k, v in self.profile.items()}, engine_mb=round(len(self.engine_bytes) / 2**20, 1),
                    layers=self.engine.num_layers, strongly_typed=self.options.strongly_typed)
        return info


def trt_availability(device: str, module: str) -> Availability:
    """Every reason that stands, not only the first: a missing library and no GPU are both worth knowing."""
    import importlib

    reasons = []
    try:
        mod = importlib.import_module(module)
        if getattr(mod, "__file__", None) is None:  # tensorrt-stubs alone makes an empty namespace package
            reasons.append(f"the {module} package here is type stubs only, not the library")
    except Exception as e:
        reasons.append(f"{module} is not installed ({type(e).__name__}: {e})")
    if not device.startswith("cuda"):
        reasons.append(f"TensorRT runs on CUDA devices, not {device}")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA device")
    return Availability.no("; ".join(reasons)) if reasons else Availability.yes()


class TensorRTBackend(Backend):
    name = "tensorrt"
    precisions = (Precision.FP32, Precision.FP16, Precision.BF16)
    devices = ("cuda",)
    options_type = TrtOptions

    def availability(self, device: str = "cuda") -> Availability:
        return trt_availability(device, "tensorrt")

    def _compile(self, captured: Captured, precision: Precision, device: str, options: Any, shapes: list[Shape]) -> CompiledModel:
        import tensorrt as trt

        profile = input_profile(captured.bundle, profile_shapes(captured.bundle, shapes, options))
        gpu = _gpu(device)
        onnx = captured.onnx_path(precision if options.strongly_typed else Precision.FP32)
        key = "-".join([captured.graph_hash, precision.value, f"trt{trt.__version__}", gpu["capability"],
                        hashlib.sha256(json.dumps([options.build_options(), profile], default=str).encode()).hexdigest()[:12]])
        final = captured.cache_dir / "tensorrt" / key
        if not (final / ENGINE_FILE).is_file():
            cache = captured.cache_dir / "tensorrt" / f"timing-{gpu['capability']}-trt{trt.__version__}.cache"
            with staged_dir(final) as tmp:
                (tmp / ENGINE_FILE).write_bytes(build_engine(onnx, profile, precision, options, cache if options.timing_cache else None))
        bundle = captured.bundle
        return TrtModel((final / ENGINE_FILE).read_bytes(), profile, backend=self.name, precision=precision, device=device,
                        input_names=bundle.input_names, output_names=bundle.output_names, options=options)

    def _load(self, directory: Path, meta: dict[str, Any], device: str) -> CompiledModel:
        import tensorrt as trt

        profile = read_manifest(directory, trt.__version__, _gpu(device))
        return TrtModel((directory / ENGINE_FILE).read_bytes(), profile, backend=self.name, precision=Precision(meta["precision"]),
                        device=device, input_names=tuple(meta["inputs"]), output_names=tuple(meta["outputs"]),
                        options=TrtOptions.from_mapping(meta.get("options", {})))
