"""ONNX Runtime's graph recipe (backends/ort_graph.py): its transformers optimizer after onnxscript's
fusions, attention on a mask index only where the bias is the padding mask, QAttention for
int8-dynamic, what is left unfused said in the row, and the fallback when ORT refuses a graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import backends as registry
from backends.ort_graph import attention_on_mask_index, is_padding_bias
from pipeline.capture import Captured, capture
from pipeline.inputs import Shape, make_inputs
from pipeline.models import ModelBundle, load_model
from pipeline.precision import Precision

ORT = registry.get("onnxruntime")


def _bias_graph(causal: bool) -> onnx.ModelProto:
    """bias[b, 1, q, k] from mask[b, k]: 0 where kept, -3.4e38 where padded (and, if `causal`, where k > q)."""
    nodes = [
        helper.make_node("Cast", ["mask"], ["keep"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["keep", "axes"], ["keep4"]),  # [b, 1, 1, k]
    ]
    keep = "keep4"
    if causal:
        nodes += [
            helper.make_node("Shape", ["mask"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["seq"]),
            helper.make_node("Concat", ["seq", "seq"], ["square"], axis=0),
            helper.make_node("ConstantOfShape", ["square"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
            helper.make_node("Trilu", ["ones"], ["lower"], upper=0),
            helper.make_node("Cast", ["lower"], ["tri"], to=TensorProto.BOOL),
            helper.make_node("And", ["keep4", "tri"], ["both"]),
        ]
        keep = "both"
    nodes.append(helper.make_node("Where", [keep, "zero", "neg"], ["bias"]))
    graph = helper.make_graph(
        nodes, "bias", [helper.make_tensor_value_info("mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("bias", TensorProto.FLOAT, None)],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]), helper.make_tensor("one", TensorProto.INT64, [1], [1]),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]), helper.make_tensor("neg", TensorProto.FLOAT, [], [-3.4e38])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_only_a_pure_padding_bias_counts_as_a_mask_index() -> None:
    assert is_padding_bias(_bias_graph(causal=False), "bias", "mask")
    assert not is_padding_bias(_bias_graph(causal=True), "bias", "mask")  # a causal bias is more than padding


def test_attention_with_a_causal_bias_keeps_its_bias() -> None:
    model = _bias_graph(causal=True)
    model.graph.node.append(helper.make_node("Attention", ["x", "w", "b", "", "", "bias"], ["y"], domain="com.microsoft", num_heads=2))
    assert attention_on_mask_index(model) == 0
    assert list(model.graph.node[-1].input)[5] == "bias"


@pytest.fixture(scope="module")
def bert(tiny_captured: Captured) -> Captured:
    return tiny_captured


def _fused_ops(engine: object) -> dict[str, int]:
    return engine.describe()["fused_ops"]  # type: ignore[attr-defined, no-any-return]


def test_the_recipe_fuses_what_ort_fuses_and_matches_the_unrewritten_graph(bert: Captured, tiny_bert: ModelBundle) -> None:
    recipe = ORT.compile(bert, Precision.FP32, "cpu")
    plain = ORT.compile(bert, Precision.FP32, "cpu", {"transformers_optimizer": False})
    info = recipe.describe()
    assert info["fusions_ort_recipe"]["EmbedLayerNormalization"] == 1
    assert info["fusions_ort_recipe"]["AttentionOnMaskIndex"] == 2  # both layers' bias proven to be the padding mask
    assert "EmbedLayerNormalization" not in _fused_ops(plain) and info["fusions_ort_recipe"] and not plain.describe()["fusions_ort_recipe"]
    graph = onnx.load(str(recipe.path), load_external_data=False).graph  # type: ignore[attr-defined]
    assert not [n for n in graph.node if n.op_type == "Where"]  # the bias's arithmetic is gone with it
    for shape in (Shape(1, 8), Shape(3, 16)):
        x = make_inputs(tiny_bert, shape, "padded", seed=3)  # rows of several lengths: the mask matters
        assert x["attention_mask"].min() == 0
        a, b = recipe(x), plain(x)
        for name in a:
            keep = x["attention_mask"].bool()
            assert torch.allclose(a[name][keep], b[name][keep], atol=1e-5), name


def test_int8_dynamic_quantizes_attention_on_the_fused_graph(bert: Captured) -> None:
    engine = ORT.compile(bert, Precision.INT8_DYNAMIC, "cpu")
    assert _fused_ops(engine).get("QAttention") == 2 and engine.notes() == []
    # without the mask index, quantize_dynamic leaves attention in fp32, and the row says so
    unquantized = ORT.compile(bert, Precision.INT8_DYNAMIC, "cpu", {"transformers_optimizer": False})
    assert "QAttention" not in _fused_ops(unquantized)
    assert any("2 Attention left in floating point" in n for n in unquantized.notes())


def test_int8_dynamic_quantizes_a_classifier_whose_gemm_weight_is_transposed(cache_dir: Path) -> None:
    # quantize_dynamic transposes a Gemm's weight; the shapes the exporter recorded for it used to
    # contradict its own shape inference ("Inferred shape and existing shape differ")
    bundle = load_model("tiny-distilbert-sst2")
    engine = ORT.compile(capture(bundle, cache_dir), Precision.INT8_DYNAMIC, "cpu")
    x = make_inputs(bundle, Shape(2, 16), "text")
    logits = engine(x)["logits"]
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_a_graph_ort_refuses_to_run_falls_back_a_step_and_says_so(cache_dir: Path) -> None:
    bundle = load_model("tiny-gpt2")  # fused, its graph has a Gemm fed rank 3, which ORT refuses
    engine = ORT.compile(capture(bundle, cache_dir), Precision.FP32, "cpu")
    assert any(n.startswith("runs without onnxscript's fusions") for n in engine.notes())
    assert engine.options.fuse is False  # type: ignore[attr-defined]  (the manifest records what was built)
    x = make_inputs(bundle, Shape(2, 8), "text")
    with torch.no_grad():
        ref = bundle.module(**x)[0]
    assert np.allclose(engine(x)[bundle.output_names[0]].numpy(), ref.numpy(), atol=1e-4)
