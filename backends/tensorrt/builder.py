"""Building a TensorRT engine from ONNX: the ONNX parser, one optimization profile, fp16/bf16 by
builder flags or a strongly typed network, int8 by explicit quantization (a strongly typed network
from the Q/DQ graph), and a persisted timing cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import BackendError, InputError
from pipeline.fsutil import atomic_write
from pipeline.precision import Precision

from .profile import Profile, ProfileOptions


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


def precision_flags(precision: Precision, strongly_typed: bool) -> tuple[list[str], list[str]]:
    """(network creation flags, builder flags) by name. A strongly typed network takes its types
    from the graph and refuses precision flags; a weakly typed one gets FP16 or BF16."""
    if strongly_typed or precision == Precision.INT8:  # int8: the Q/DQ graph's explicit types
        return ["STRONGLY_TYPED"], []
    return [], {Precision.FP32: [], Precision.FP16: ["FP16"], Precision.BF16: ["BF16"]}[precision]


def parser_errors(parser: Any) -> str:
    """The ONNX parser's errors as one message: node, operator, description."""
    msgs = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = f"node {e.node_name()} ({e.node_operator()}): " if hasattr(e, "node_name") and e.node_name() else ""
        msgs.append(node + e.desc())
    return "; ".join(msgs) or "no error reported"


def logger(trt: Any) -> Any:
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

    log = logger(trt)
    builder = trt.Builder(log)
    net_flags, builder_flags = precision_flags(precision, options.strongly_typed)
    flags = 0
    for name in net_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
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
        raise BackendError("TensorRT could not build the engine: " + ("; ".join(log.errors[-3:]) or "no error logged"))
    if cache is not None and timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))
