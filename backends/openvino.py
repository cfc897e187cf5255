"""OpenVINO: the captured program through openvino.convert_model, the CPU plugin's own fusions, its
arithmetic set explicitly per precision, int8 by NNCF; saved as IR (openvino_model.xml/.bin).

The CPU plugin's default inference precision on a CPU with bf16 units is bf16, which fails fp32's
tolerance (max abs 3e-2 on MiniLM), and where a CPU lacks the arithmetic asked for the plugin runs
another one without a word (f16 becomes bf16 on AVX512-BF16, f32 on AVX2): Kiln sets the hint for
every engine and refuses an engine whose plugin reports another precision than the one asked.
"""

from __future__ import annotations

import collections
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.calibration import calibration_batches, check_finite
from pipeline.capture import Captured
from pipeline.env import cpu_flags, version
from pipeline.errors import BackendError
from pipeline.fsutil import cache_entry, cached_dir
from pipeline.inputs import Shape
from pipeline.manifest import Manifest
from pipeline.precision import Precision

from .base import Availability, Backend, BackendOptions, CompiledModel, EngineSpec, Tensors, ok, runtime_option

Hint = Literal["auto", "f32", "bf16", "f16"]
XML, BIN = "openvino_model.xml", "openvino_model.bin"  # optimum-intel's names for an IR directory
# The plugin's arithmetic for what is not int8, per precision: both int8s keep the rest at f32.
HINTS = {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.FP16: "f16", Precision.INT8: "f32", Precision.INT8_DYNAMIC: "f32"}
# The CPU flags the plugin needs for each arithmetic: without them it quietly runs another one.
UNITS = {"bf16": ("avx512_bf16", "amx_bf16"), "f16": ("avx512_fp16", "amx_fp16")}
# Kiln's calibration methods as NNCF's activation range estimators (it has no entropy estimator).
RANGES = {"minmax": "MINMAX", "percentile": "MEAN_QUANTILE", "histogram": "HISTOGRAM"}


@dataclass(frozen=True)
class OpenVinoOptions(BackendOptions):
    # The plugin's arithmetic for what is not int8; "auto": the precision's own (f32 for fp32 and
    # both int8s). bf16 for an int8 engine trades accuracy for speed; its verdict says which won.
    inference_precision: Hint = "auto"
    threads: int = runtime_option(0)  # 0: as many as torch uses
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = runtime_option("LATENCY")


def _hint(spec: EngineSpec) -> str:
    options: OpenVinoOptions = spec.options  # type: ignore[assignment]
    return HINTS[spec.precision] if options.inference_precision == "auto" else options.inference_precision


def _missing_units(hint: str) -> str | None:
    units = UNITS.get(hint)
    if units is None or cpu_flags() & set(units):
        return None
    return (f"this CPU has no {hint} arithmetic ({' or '.join(units)}): OpenVINO's CPU plugin would run another "
            f"precision where {hint} is asked")


# A mask value that is finite in f32, bf16 and f16 alike, and far below any attention score.
MASKED = -65504.0


def _finite_masks(model: Any) -> int:
    """Every boolean attention mask made additive with a large finite negative, as Hugging Face's
    float masks are. A query row that attends to nothing (a left pad) then gets finite weights
    where OpenVINO's boolean SDPA gives NaN, which the pads' values carry to every real token
    (torch's sdpa gives zeros there); every other row is unchanged, exp(-65504) being 0."""
    import openvino as ov
    from openvino import opset13 as ops

    changed = 0
    for op in model.get_ordered_ops():
        if (op.get_type_name() == "ScaledDotProductAttention" and op.get_input_size() > 3
                and op.input(3).get_element_type() == ov.Type.boolean):
            dtype = op.input(0).get_element_type()
            additive = ops.select(op.input(3).get_source_output(), ops.constant(0.0, dtype), ops.constant(MASKED, dtype))
            op.input(3).replace_source_output(additive.output(0))
            changed += 1
    if changed:
        model.validate_nodes_and_infer_types()
    return changed


def _quiet_nncf() -> Any:
    import nncf

    nncf.set_log_level(logging.ERROR)  # its tables and progress bars would go to the run's output
    return nncf


def _quantize(model: Any, captured: Captured, precision: Precision) -> tuple[Any, str]:
    """The IR quantized by NNCF, and how, in words. int8: static, activation ranges estimated by
    NNCF over Kiln's calibration batches (the same rows every int8 engine sees); int8-dynamic: int8
    weights, activations quantized by the CPU plugin at run time."""
    nncf = _quiet_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    q = captured.quant
    if precision == Precision.INT8_DYNAMIC:
        if not q.per_channel:
            raise BackendError("NNCF's int8 weight compression is per channel only (drop --per-tensor-weights)")
        return (nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM),
                "nncf.compress_weights int8_sym per channel; activations quantized by the plugin at run time")
    if q.method not in RANGES:
        raise BackendError(f"NNCF has no {q.method} range estimator: calibrate with {', '.join(RANGES)}")
    batches = calibration_batches(captured.bundle, q)
    check_finite(batches)
    data = nncf.Dataset(batches, lambda b: {k: v.numpy() for k, v in b.items()})
    params = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=q.per_channel),
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, RANGES[q.method]))
    quantized = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches),
                              advanced_parameters=params)
    return quantized, (f"nncf.quantize (transformer), {RANGES[q.method].lower()} ranges over {q.samples} calibration rows, "
                       f"weights per {'channel' if q.per_channel else 'tensor'}")


def _tensor(t: torch.Tensor) -> Any:
    """A torch tensor as OpenVINO takes it, sharing its memory: numpy has no bf16, so bf16 goes by its bits."""
    t = t.detach().cpu().contiguous()
    if t.dtype != torch.bfloat16:
        return t.numpy()
    import openvino as ov

    return ov.Tensor(t.view(torch.int16).numpy(), list(t.shape), ov.Type.bf16)


def _text(value: Any) -> str:
    """A plugin property as its short name: f32, not <Type: 'float32'>; PERFORMANCE, not ExecutionMode.PERFORMANCE."""
    if hasattr(value, "to_string"):
        return str(value.to_string())
    return str(getattr(value, "name", value))


def _torch(t: Any) -> torch.Tensor:
    import openvino as ov

    out = torch.from_numpy(np.array(t.data))  # a bf16 tensor's data reads as float16 bits
    return out.view(torch.bfloat16) if t.element_type == ov.Type.bf16 else out


class OpenVinoModel(CompiledModel):
    options: OpenVinoOptions

    def __init__(self, spec: EngineSpec, xml: Path, quantizer: str = "") -> None:
        super().__init__(spec)
        import openvino as ov

        self.xml, self.quantizer, self.hint = xml, quantizer, _hint(spec)
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": self.options.performance_hint,
                  "INFERENCE_NUM_THREADS": self.options.threads or torch.get_num_threads()}
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
        ran = _text(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        if ran != self.hint:
            raise BackendError(f"OpenVINO's CPU plugin runs {ran} where {self.hint} was asked: this CPU lacks the arithmetic")
        self.request = self.compiled.create_infer_request()
        # the program's inputs a graph never reads are not the IR's
        self.in_names = {i.get_any_name() for i in self.compiled.inputs}

    def run(self, inputs: Tensors) -> Tensors:
        feeds = {n: _tensor(t) for n, t in inputs.items() if n in self.in_names}
        self.request.infer(feeds, share_inputs=True)
        # outputs by position (convert_model does not keep the program's output names), copied
        # out of the request's buffers, which the next call overwrites
        return {n: _torch(self.request.get_output_tensor(i)) for i, n in enumerate(self.output_names)}

    def _save_files(self, directory: Path) -> list[Path]:
        files = []
        for name in (XML, BIN):
            shutil.copy2(self.xml.parent / name, directory / name)
            files.append(directory / name)
        return files

    def _extra_meta(self) -> dict[str, Any]:
        return {"quantizer": self.quantizer} if self.quantizer else {}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        props = ("INFERENCE_PRECISION_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "EXECUTION_MODE_HINT")
        info["plugin"] = {"device": "CPU", **{p: _text(self.compiled.get_property(p)) for p in props}}
        if self.quantizer:
            info["quantizer"] = self.quantizer
        # the graph the plugin executes, after its fusions: what each layer became
        ops = collections.Counter(n.get_rt_info()["layerType"].astype(str) for n in self.compiled.get_runtime_model().get_ops())
        info["runtime_ops"] = dict(ops.most_common(12))
        return info

    def notes(self) -> list[str]:
        return [f"inference precision {self.hint}" + (f"; {self.quantizer}" if self.quantizer else "")]


class OpenVinoBackend(Backend):
    name = "openvino"
    support = {Precision.FP32: ok(), Precision.FP16: ok(generates=False), Precision.BF16: ok(),
               Precision.INT8: ok(generates=False), Precision.INT8_DYNAMIC: ok(generates=False)}
    devices = ("cpu",)
    runs_on = "OpenVINO runs on the CPU here (it has no CUDA plugin)"
    options_type = OpenVinoOptions
    requires = {"openvino": "minor"}
    # Triton names OpenVINO by backend, not platform; its model files are model.xml/.bin
    serving_platform = "openvino"
    serving_field = "backend"
    serving_files = {XML: "model.xml", BIN: "model.bin"}
    calibrates = False  # NNCF estimates the ranges itself, from Kiln's calibration batches

    def _check(self, device: str) -> Availability:
        import openvino as ov

        if "CPU" not in ov.Core().available_devices:
            return Availability.no("OpenVINO sees no CPU plugin")
        return Availability.yes()

    def _unsupported_here(self, precision: Precision, device: str) -> str | None:
        return _missing_units(HINTS[precision])

    def _compile(self, captured: Captured, spec: EngineSpec, shapes: list[Shape]) -> CompiledModel:
        if captured.prequantized is not None:
            raise BackendError("a step quantized before its capture (PT2E ops) is not OpenVINO's to convert")
        missing = _missing_units(_hint(spec))
        if missing:
            raise BackendError(missing)
        quant = spec.quantization() if spec.precision.quantized else {}
        final = cache_entry(captured.cache_dir, "openvino", f"{captured.graph_hash}-{spec.precision.value}",
                            {"quantization": quant, "passes": ["finite-masks"], **{d: version(d) for d in ("torch", "openvino", "nncf")}})

        def make(tmp: Path) -> None:
            import openvino as ov

            try:
                model = ov.convert_model(captured.program)
            except Exception as e:  # its message opens with the C++ check's file and line; the ops it lacks come last
                lacking = re.search(r"No conversion rule found for operations: (.*)", str(e))
                if lacking is None:
                    raise
                raise BackendError(f"OpenVINO {version('openvino')} cannot convert {lacking.group(1).strip()}") from e
            _finite_masks(model)
            how = ""
            if spec.precision.quantized:
                model, how = _quantize(model, captured, spec.precision)
            ov.save_model(model, str(tmp / XML), compress_to_fp16=False)  # its default would store the weights as fp16
            (tmp / "quantizer.txt").write_text(how)

        cached_dir(final, make)
        return OpenVinoModel(spec, final / XML, (final / "quantizer.txt").read_text())

    def _load(self, directory: Path, spec: EngineSpec, manifest: Manifest) -> CompiledModel:
        return OpenVinoModel(spec, directory / XML, str(manifest.engine.get("quantizer", "")))

