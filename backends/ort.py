"""ONNX Runtime: ONNX from the captured program, ORT fusions, graph optimizations; fp16 by the ONNX converter."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.capture import Captured
from pipeline.env import version
from pipeline.errors import BackendError, short
from pipeline.fsutil import cache_entry, cached_dir
from pipeline.inputs import Shape
from pipeline.manifest import Manifest
from pipeline.precision import Precision

from .base import Availability, Backend, BackendOptions, CompiledModel, EngineSpec, Tensors, ok, refused, runtime_option

Level = Literal["disable", "basic", "extended", "all"]
DATA = "model.onnx.data"


@dataclass(frozen=True)
class OrtOptions(BackendOptions):
    # onnxscript's ORT fusions (Attention, SkipLayerNorm, BiasGelu) on the dynamo graph before ORT sees it.
    fuse: bool = True
    # then ONNX Runtime's own recipe on that graph (backends/ort_graph.py): its transformers optimizer
    # (EmbedLayerNormalization) and attention on a mask index, which int8-dynamic quantizes to QAttention
    transformers_optimizer: bool = True
    graph_optimization: Level = "all"
    intra_op_threads: int = runtime_option(0)  # 0: as many as torch uses
    # ORT's worker threads spin after each run by default; beside torch's threads in one process
    # (an interleaved benchmark) the spinning steals the cores from whoever runs next.
    spin: bool = runtime_option(False)


def _level(name: str) -> Any:
    import onnxruntime as ort

    L = ort.GraphOptimizationLevel
    return {"disable": L.ORT_DISABLE_ALL, "basic": L.ORT_ENABLE_BASIC, "extended": L.ORT_ENABLE_EXTENDED, "all": L.ORT_ENABLE_ALL}[name]


def _session_options(options: OrtOptions) -> Any:
    """ORT's session options from Kiln's: optimization level, threads, no spinning, quiet."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _level(options.graph_optimization)
    so.intra_op_num_threads = options.intra_op_threads or torch.get_num_threads()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
    so.log_severity_level = 3
    return so


def _providers(device: str) -> list[Any]:
    if device.startswith("cuda"):
        idx = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _build_onnx(captured: Captured, precision: Precision, options: OrtOptions, out: Path) -> dict[str, int]:
    """Write the engine's model.onnx into `out`; returns the fusions applied."""
    import onnx
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    src = captured.onnx_path()
    fusions: dict[str, int] = {}
    if precision == Precision.INT8:
        # Q/DQ on the unfused graph (the calibration names its tensors); ORT fuses Q/DQ + MatMul
        # into integer kernels at load.
        from .quantize import qdq_onnx

        qdq_onnx(captured, out)
        return fusions
    if precision == Precision.FP16:
        # The converter works on plain ONNX ops; ORT's own optimizer fuses the fp16 graph at load.
        import warnings

        from onnxconverter_common import float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns for every fp32 constant it clamps
            proto = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
        onnx.save_model(proto, str(out / "model.onnx"), save_as_external_data=True, location=DATA)
        return fusions
    model = ir.load(str(src))
    ir.external_data.load_to_model(model)  # the steps below take protos with their weights inside
    if options.fuse:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        model, counts = optimize_for_ort(model)
        fusions = {k: v for k, v in counts.items() if v}
    if options.fuse and options.transformers_optimizer:
        from . import ort_graph

        proto, stats = ort_graph.transformers_optimizer(ir.to_proto(model))
        fusions.update({f"ort.{k}": v for k, v in stats.items()})
        if masked := ort_graph.attention_on_mask_index(proto):
            fusions["ort.AttentionOnMaskIndex"] = masked
        model = ir.from_proto(proto)
        RemoveUnusedNodesPass()(model)  # the attention bias's arithmetic, now unused
    if precision == Precision.INT8_DYNAMIC:  # after the fusions: quantize_dynamic also quantizes fused Attention
        from .quantize import dynamic_onnx

        # without recorded shapes: the exporter's and the optimizer's value_info (the weights' among
        # them) contradict the quantizer's own inference once it transposes a Gemm's weight
        proto = ir.to_proto(model)
        del proto.graph.value_info[:]
        onnx.save_model(proto, str(out / "fused.onnx"), save_as_external_data=True, location="fused.onnx.data")
        dynamic_onnx(out / "fused.onnx", out, captured.quant.per_channel)
        for name in ("fused.onnx", "fused.onnx.data"):
            (out / name).unlink()
        return fusions
    ir.save(model, str(out / "model.onnx"), external_data=DATA)
    return fusions


class OrtModel(CompiledModel):
    options: OrtOptions

    def __init__(self, spec: EngineSpec, path: Path, fusions: dict[str, int], record_optimized: bool = True) -> None:
        super().__init__(spec)
        import onnxruntime as ort

        self.path, self.fusions, self.record_optimized = path, fusions, record_optimized
        self.fallback = ""  # how the build departed from the options asked for
        so = _session_options(self.options)
        # ORT's optimized graph, for describe(): in a directory of this engine's own, never beside
        # a cache entry or an artifact that other processes read
        self._scratch = tempfile.TemporaryDirectory(prefix="kiln-ort-")
        self.optimized = Path(self._scratch.name) / "optimized.onnx"
        if record_optimized:
            so.optimized_model_filepath = str(self.optimized)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=_providers(self.device))
        except Exception as e:
            raise BackendError(f"onnxruntime could not load {path.name}: {str(e).splitlines()[0]}") from e
        self.providers = self.session.get_providers()
        self.out_names = [o.name for o in self.session.get_outputs()]
        self.in_names = {i.name for i in self.session.get_inputs()}  # the exporter drops inputs a graph never reads

    def run(self, inputs: Tensors) -> Tensors:
        if self.device == "cpu":
            feeds = {n: t.detach().cpu().numpy() for n, t in inputs.items() if n in self.in_names}
            outs = self.session.run(self.out_names, feeds)
            return {n: torch.from_numpy(np.asarray(o)) for n, o in zip(self.output_names, outs)}
        # CUDA: bind torch tensors in place, outputs allocated by ORT on the device.
        outs = _run_bound(self.session, inputs, self.out_names, self.device)
        return dict(zip(self.output_names, outs.values()))

    def _save_files(self, directory: Path) -> list[Path]:
        files = []
        for name in ("model.onnx", DATA):
            if (self.path.parent / name).exists():
                shutil.copy2(self.path.parent / name, directory / name)
                (directory / name).chmod(0o644)  # onnxruntime's quantizer writes its data file owner-only
                files.append(directory / name)
        return files

    def notes(self) -> list[str]:
        import onnx

        from .ort_graph import unfused

        graph = onnx.load(str(self.path), load_external_data=False).graph
        lost = unfused(collections.Counter(n.op_type for n in graph.node), self.precision == Precision.INT8_DYNAMIC)
        return ([self.fallback] if self.fallback else []) + lost

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["providers"] = self.providers
        info["fusions_onnxscript"] = {k: v for k, v in self.fusions.items() if not k.startswith("ort.")}
        info["fusions_ort_recipe"] = {k[4:]: v for k, v in self.fusions.items() if k.startswith("ort.")}
        if self.record_optimized and self.optimized.exists():
            import onnx

            graph = onnx.load(str(self.optimized), load_external_data=False).graph
            ops = collections.Counter(n.op_type for n in graph.node)
            info["nodes_after_ort"] = sum(ops.values())
            info["fused_ops"] = {k: v for k, v in sorted(ops.items()) if k in _FUSED}
        return info


_NP = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.float16: np.float16, torch.bool: np.bool_}
_FUSED = {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu",
          "FastGelu", "Gelu", "FusedMatMul", "QAttention", "QEmbedLayerNormalization", "LayerNormalization", "SkipSimplifiedLayerNormalization", "MatMulNBits", "GroupQueryAttention"}


# built from the unfused graph whatever the options say (backends/ort_graph.py, docs/backends.md)
_UNFUSED = (Precision.INT8, Precision.FP16)


class OrtBackend(Backend):
    name = "onnxruntime"
    support = {Precision.FP32: ok(), Precision.FP16: ok(generates=False), Precision.INT8: ok(generates=False),
               Precision.INT8_DYNAMIC: ok(generates=False),
               Precision.BF16: refused("onnxruntime has no bf16 kernels for these ops, and the ONNX converter makes fp16 only")}
    options_type = OrtOptions
    requires = {"onnxruntime": "minor"}
    serving_platform = "onnxruntime_onnx"
    serving_files = {"model.onnx": "model.onnx", DATA: DATA}

    def _check(self, device: str) -> Availability:
        import onnxruntime as ort

        if device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
            return Availability.no("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        return Availability.yes()

    def _compile(self, captured: Captured, spec: EngineSpec, shapes: list[Shape]) -> CompiledModel:
        options: OrtOptions = spec.options  # type: ignore[assignment]
        libs = {d: version(d) for d in ("torch", "onnx", "onnxscript", "onnx-ir", "onnxconverter-common", "onnxruntime")}
        final = cache_entry(captured.cache_dir, "onnxruntime", f"{captured.graph_hash}-{spec.precision.value}",
                            {"options": options.build_options(), "quantization": spec.quantization(), **libs})

        def make(tmp: Path) -> None:
            fusions = _build_onnx(captured, spec.precision, options, tmp)
            (tmp / "fusions.txt").write_text("".join(f"{k} {v}\n" for k, v in fusions.items()))

        if not final.exists():
            captured.onnx_path()  # the export's own failure is no recipe step's: it raises here, not in the fallback below
        try:
            cached_dir(final, make)
            fusions = {k: int(v) for k, v in (line.split() for line in (final / "fusions.txt").read_text().splitlines())}
            model = OrtModel(spec, final / "model.onnx", fusions)
            # some fused graphs ORT loads but refuses to run (a Gemm fed rank 3)
            model.run({k: v.to(model.device) for k, v in captured.example.items()})
            return model
        except Exception as e:
            # a recipe step that fails on a graph (ORT's optimizer finds a cycle in a multiple-choice
            # BERT's), or a fused graph ORT refuses (a Gemm fed rank 3 in GPT-2's): the graph one
            # step earlier still runs, and the engine says so (its manifest records the options it
            # was built with).
            if not options.fuse or spec.precision in _UNFUSED:
                raise
            step = "ORT's transformers optimizer" if options.transformers_optimizer else "onnxscript's fusions"
            lighter = (dataclasses.replace(options, transformers_optimizer=False) if options.transformers_optimizer
                       else dataclasses.replace(options, fuse=False))
            fallback = self._compile(captured, dataclasses.replace(spec, options=lighter), shapes)
            assert isinstance(fallback, OrtModel)
            fallback.fallback = fallback.fallback or f"runs without {step}: with it the graph failed ({short(e)[:160]})"
            return fallback

    def _load(self, directory: Path, spec: EngineSpec, manifest: Manifest) -> CompiledModel:
        return OrtModel(spec, directory / "model.onnx", {}, record_optimized=False)


def _run_bound(session: Any, inputs: Mapping[str, torch.Tensor], names: list[str], device: str) -> dict[str, torch.Tensor]:
    """One run through IO binding: torch tensors bound where they lie, outputs allocated by ORT on
    the device and handed back as torch tensors without a copy."""
    cuda = device.startswith("cuda")
    where, idx = ("cuda", torch.device(device).index or 0) if cuda else ("cpu", 0)
    wanted = {i.name for i in session.get_inputs()}  # the exporter drops inputs a graph never reads
    binding = session.io_binding()
    for n, t in inputs.items():
        if n in wanted:
            t = t.contiguous()
            binding.bind_input(n, where, idx, _NP[t.dtype], list(t.shape), t.data_ptr())
    for n in names:
        binding.bind_output(n, where, idx)
    session.run_with_iobinding(binding)
    outs = binding.get_outputs()
    if cuda:
        return {n: torch.from_dlpack(v.to_dlpack()) if hasattr(v, "to_dlpack") else torch.from_numpy(v.numpy()).to(device)
                for n, v in zip(names, outs)}
    return {n: torch.from_numpy(v.numpy()) for n, v in zip(names, outs)}
