"""int8 for every backend: one calibration and one PT2E quantization of the captured program.

The calibration runs onnxruntime's calibrators (MinMax, Percentile, Entropy, Distribution) on the
captured program's ONNX export, over the calibration set, and keeps one range per linear layer's
input, keyed by the layer's module path and call index. That key is the same in the ONNX graph
(the exporter records each node's module scopes) and in the captured program (nn_module_stack),
so ONNX Runtime, TensorRT and PT2E (eager, Inductor) quantize with the same ranges.
Only linear layers are quantized (as the x86 Inductor quantizer does): attention's activation
products, softmax, layer norm and GELU stay in floating point on every backend.
"""

from __future__ import annotations

import ast
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.calibration import FILE, Calibration, Layer, QuantSpec, calibration_batches, check_finite
from pipeline.capture import Captured, export
from pipeline.env import quiet_import, version
from pipeline.errors import BackendError, InputError
from pipeline.fsutil import cache_entry, cached_dir
from pipeline.precision import Precision

ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy", "histogram": "Distribution"}
# onnxruntime's entropy calibrator defaults to 128 bins for 128 quantized bins, where the only
# threshold it can choose is the whole range (minmax again); 2048 bins as TensorRT's entropy
# calibrator uses give it thresholds to choose from.
_METHOD_OPTIONS: dict[str, dict[str, Any]] = {"entropy": {"num_bins": 2048, "num_quantized_bins": 128}}


# eager's and Inductor's int8: torchao's x86 quantizer targets oneDNN's CPU kernels.
PT2E_CPU_ONLY = "int8 through PT2E (torchao's x86 Inductor quantizer) runs on the CPU only; on CUDA use tensorrt"


def _scope(node: Any) -> tuple[str, str, str]:
    """(module path, fx node name, fx node text) an ONNX node was exported from, as the dynamo
    exporter records them in the node's metadata."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    text = meta.get("pkg.torch.onnx.fx_node", "")
    return (scopes[-2] if len(scopes) >= 2 else node.name), text.split(" ")[0].lstrip("%"), text


def onnx_linear_inputs(model: Any) -> list[tuple[str, str, str, str]]:
    """(key, fx node, input tensor, ONNX node name) of the MatMul/Gemm of every aten.linear with a
    constant weight: the layers PT2E quantizes, and no others."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    seen: Counter[str] = Counter()
    out = []
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts and n.input[0] not in consts:
            module, fx, text = _scope(n)
            if "aten.linear" not in text:
                continue
            out.append((f"{module}#{seen[module]}", fx, n.input[0], n.name))
            seen[module] += 1
    return out


def fx_linear_keys(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """The same keys for the aten.linear nodes of a captured program's module."""
    seen: Counter[str] = Counter()
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == torch.ops.aten.linear.default:
            stack = n.meta.get("nn_module_stack") or {}
            module = list(stack.values())[-1][0] if stack else n.name
            out[n] = f"{module}#{seen[module]}"
            seen[module] += 1
    return out


def calibrate(captured: Captured) -> Calibration:
    """The calibration for captured.quant, from the cache when a whole entry exists."""
    spec = captured.quant
    cached = captured.calibrations.get(spec)
    if cached is not None:
        return cached
    entry = cache_entry(captured.cache_dir, "calibration", f"{captured.graph_hash}-{spec.label}",
                        {"spec": spec.to_dict(), "calibrator": _METHOD_OPTIONS.get(spec.method, {}),
                         **{d: version(d) for d in ("torch", "onnx", "onnxruntime")}})

    def make(tmp: Path) -> None:
        _calibrate(captured, spec).save(tmp / FILE)

    path = cached_dir(entry, make) / FILE
    calibration = Calibration.load(path)
    captured.calibrations[spec] = calibration
    return calibration


def _calibrate(captured: Captured, spec: QuantSpec) -> Calibration:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    src = captured.onnx_path()
    layers = onnx_linear_inputs(onnx.load(str(src), load_external_data=False))
    batches = calibration_batches(captured.bundle, spec)
    check_finite(batches)
    if not layers:  # Calibration refuses an empty layer list with the user's message
        return Calibration(spec, captured.graph_hash, (), 0)
    names = set(captured.bundle.input_names)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.it: Iterator[dict[str, Any]] = iter([{k: v.numpy() for k, v in b.items() if k in names} for b in batches])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory(prefix="kiln-calib-") as tmp:
        calibrator = create_calibrator(src, ["MatMul", "Gemm"], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=getattr(CalibrationMethod, ORT_METHODS[spec.method]),
                                       use_external_data_format=True,
                                       extra_options=_METHOD_OPTIONS.get(spec.method, {}) | {"symmetric": False})
        calibrator.collect_data(Reader())
        ranges = calibrator.compute_data()
    out = []
    for key, fx, tensor, _ in layers:
        if tensor not in ranges.data:
            raise BackendError(f"onnxruntime's calibrator gave no range for {tensor} ({key})")
        lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in ranges.data[tensor].range_value)
        out.append(Layer(key, fx, tensor, lo, hi))
    return Calibration(spec, captured.graph_hash, tuple(out), sum(next(iter(b.values())).shape[0] for b in batches))


def _quantizer(precision: Precision, spec: QuantSpec) -> Any:
    import dataclasses

    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e import MinMaxObserver

    config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=precision == Precision.INT8_DYNAMIC)
    changes: dict[str, Any] = {}
    if precision == Precision.INT8:
        # The ranges come from the calibration file: an observer that keeps min and max (the
        # default histogram observer derives its own range from its histogram at convert).
        changes["input_activation"] = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver)
    if not spec.per_channel:
        changes["weight"] = dataclasses.replace(config.weight, qscheme=torch.per_tensor_symmetric, ch_axis=None,
                                                observer_or_fake_quant_ctr=MinMaxObserver)
    if changes:
        config = dataclasses.replace(config, **changes)
    return xiq.X86InductorQuantizer().set_global(config)


def pt2e(captured: Captured, precision: Precision) -> torch.nn.Module:
    """The captured program quantized with PT2E (torchao's x86 Inductor quantizer): int8 takes every
    linear input's range from the calibration; int8-dynamic quantizes activations at run time.
    The converted module runs eagerly, or through torch.compile. A module quantized before it was
    captured (`Captured.prequantized`) is returned as it is: the module, not its program, because
    torch.compile of the exported int8 decode step computes wrong logits at batch 1 (torch 2.13,
    max error 2e4 where the module's is 6e-8; docs/generation.md)."""
    quiet_import("torchao")
    if captured.prequantized == precision:
        return captured.bundle.module
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    gm = captured.program.module()
    # A head computed but not returned (BERT's pooler) is a partition with no output, which the
    # quantizer's pattern matching cannot take.
    gm.graph.eliminate_dead_code()
    gm.recompile()
    keys = fx_linear_keys(gm)
    if not keys:
        raise InputError("the model has no quantizable layers (no linear layer with weights): int8 has nothing to quantize")
    prepared = prepare_pt2e(gm, _quantizer(precision, captured.quant))
    # One calibration batch through the observers: weight observers see their weights (and int8's
    # activation observers get a range, replaced below by the calibration's).
    batch = calibration_batches(captured.bundle, captured.quant)[0]
    with torch.no_grad():
        prepared(**{k: v for k, v in batch.items() if k in captured.bundle.inputs})
    if precision == Precision.INT8:
        _apply_ranges(prepared, keys, calibrate(captured))
    return _drop_unused(convert_pt2e(prepared))


def quantized_program(captured: Captured, module: torch.nn.Module) -> Callable[[], torch.export.ExportedProgram]:
    """How an int8 engine's program is had when the engine is saved: a step quantized before it was
    captured is that capture's program already (the same module, exported once); a module PT2E
    converted is exported then."""
    if captured.prequantized is not None:
        return lambda: captured.program
    return lambda: export(captured.bundle, module=module)


def _drop_unused(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """convert_pt2e adds each linear's int8 weight as a new constant and leaves the fp32 weight it
    replaced registered: unused, but saved by torch.export with the rest (a MiniLM program of
    97 MB instead of 58). Drops every parameter and buffer no node reads."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in [*gm.named_parameters(), *gm.named_buffers()] if n not in used]:
        owner, _, attr = name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
    return gm


def _apply_ranges(prepared: torch.fx.GraphModule, keys: dict[torch.fx.Node, str], calibration: Calibration) -> None:
    """Sets every activation observer's range from the calibration layer it feeds."""
    by_key, by_name = calibration.by_key(), {n.name: k for n, k in keys.items()}
    unset = []
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("activation_post_process"):
            continue
        if node.args and getattr(node.args[0], "op", "") == "get_attr":
            continue  # a weight's observer: it reads the weight itself at convert
        layers = [by_key[by_name[u.name]] for u in node.users if by_name.get(u.name) in by_key]
        if not layers:
            unset.append(str(node.args[0]))
            continue
        observer = getattr(prepared, str(node.target))
        observer.min_val = torch.tensor(min(x.low for x in layers))
        observer.max_val = torch.tensor(max(x.high for x in layers))
    if unset:
        raise BackendError(f"the calibration has no range for {len(unset)} quantized activations ({', '.join(unset[:3])}): "
                           f"it was made for another graph")


def qdq_onnx(captured: Captured, out: Path, symmetric: bool = False) -> None:
    """out/model.onnx: the captured ONNX graph with a QuantizeLinear/DequantizeLinear pair at every
    linear layer's input (the calibration's ranges) and int8 weights, by onnxruntime's
    quantize_static fed the calibration through its range cache. `symmetric`: activations int8 with
    zero point 0 (what TensorRT's explicit quantization takes); else uint8 with a zero point."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    calibration = calibrate(captured)
    src = captured.onnx_path()
    layers = onnx_linear_inputs(onnx.load(str(src), load_external_data=False))
    by_key = calibration.by_key()
    missing = [key for key, *_ in layers if key not in by_key]
    if missing:
        raise BackendError(f"the calibration has no range for {len(missing)} linear layers ({', '.join(missing[:3])}): "
                           f"it was made for another graph")
    ranges: dict[str, tuple[Any, ...]] = {}
    for key, _, tensor, _ in layers:
        lo, hi = by_key[key].low, by_key[key].high
        if symmetric:
            lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
        ranges[tensor] = (np.float32(lo), np.float32(hi))
    cache = out / "ranges.json"
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
    quantize_static(str(src), str(out / "model.onnx"), None, quant_format=QuantFormat.QDQ, per_channel=captured.quant.per_channel,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_quantize=[name for *_, name in layers], use_external_data_format=True,
                    calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=cache,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                   "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
    cache.unlink()


def dynamic_onnx(src: Path, out: Path, per_channel: bool) -> None:
    """out/model.onnx: int8 weights for every MatMul/Gemm with a constant weight, activations
    quantized at run time (onnxruntime's quantize_dynamic)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node]
    if not any(names):
        raise BackendError("the ONNX graph's nodes have no names; quantize_dynamic needs them")
    # Attention (ORT's fused op, on a mask index) becomes QAttention; the type default covers tensors
    # of ORT's own ops, which ONNX's shape inference cannot type
    quantize_dynamic(str(src), str(out / "model.onnx"), op_types_to_quantize=["MatMul", "Gemm", "Attention"],
                     per_channel=per_channel, weight_type=QuantType.QInt8, use_external_data_format=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def qdq_onnx_cached(captured: Captured, symmetric: bool) -> Path:
    """qdq_onnx in the cache, keyed by the calibration it was made from."""
    calibration = calibrate(captured)
    entry = cache_entry(captured.cache_dir, "onnx-qdq", f"{captured.graph_hash}-{'sym' if symmetric else 'asym'}",
                        {"calibration": calibration.digest, "per_channel": captured.quant.per_channel,
                         **{d: version(d) for d in ("torch", "onnx", "onnxruntime")}})
    return cached_dir(entry, lambda tmp: qdq_onnx(captured, tmp, symmetric)) / "model.onnx"
