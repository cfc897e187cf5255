"""ONNX Runtime's graph recipe on the captured program's ONNX, after onnxscript's ORT fusions:
ONNX Runtime's own transformers optimizer (EmbedLayerNormalization and whatever onnxscript left
unfused), then attention on a mask index where the attention bias is only the padding mask, so
that `quantize_dynamic` can make it QAttention. Each step keeps the graph it was given when it
does not apply; the comparator judges the result like any engine."""

from __future__ import annotations

import collections
import logging
from typing import Any

import numpy as np

MASK_INDEX = "kiln_mask_index"
_MASK_TYPES = {6: np.int32, 7: np.int64, 9: np.bool_}  # ONNX's int32, int64, bool: what a mask input may be
# ORT's Attention masks a padded key with -10000 before its softmax; a bias this negative or more
# is a padded key to the same precision.
_MASKED = -1e4


def transformers_optimizer(model: Any) -> tuple[Any, dict[str, int]]:
    """(ModelProto, fused op counts) after ONNX Runtime's transformers optimizer. opt_level 0: only
    its pattern fusions; the session applies ORT's own graph optimizations at load, as always."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # its symbolic shape inference copies the whole model several times (5x its size at the peak)
    # and serves only the removal of casts and reshapes that ORT's own optimizer removes at load
    options.enable_shape_inference = False
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its passes warn, on loggers of their own, of every pattern a graph lacks
    try:
        optimized = optimize_model(model, model_type="bert", opt_level=0, optimization_options=options)
    finally:
        logging.disable(previous)
    stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    return optimized.model, stats


def _padding_mask_input(model: Any, bias: str) -> str | None:
    """The one 2-D integer graph input the attention bias `bias` is computed from, if it is."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name: i for i in model.graph.input}
    found, todo, seen = set(), [bias], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in inputs:
            found.add(t)
        elif t in producer:
            todo.extend(x for x in producer[t].input if x)
    if len(found) != 1:
        return None
    (name,) = found
    tt = inputs[name].type.tensor_type
    return name if len(tt.shape.dim) == 2 and tt.elem_type in _MASK_TYPES else None


def is_padding_bias(model: Any, bias: str, mask: str) -> bool:
    """Whether `bias`, evaluated by ONNX Runtime from random masks at two shapes, is 0 at every kept
    key and at most -1e4 at every padded one, for every query row: a padding mask and nothing else
    (a causal or position bias fails it)."""
    import onnx
    import onnxruntime as ort

    try:
        sub = onnx.utils.Extractor(model).extract_model([mask], [bias])
        session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # a bias this check cannot evaluate on its own is not proven a padding mask
        return False
    dtype = _MASK_TYPES[next(i for i in model.graph.input if i.name == mask).type.tensor_type.elem_type]
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 5), (3, 7)):
        keep = rng.random((batch, seq)) > 0.3
        keep[:, 0] = True
        try:
            out = session.run(None, {mask: keep.astype(dtype)})[0]
        except Exception:
            return False
        if out.ndim != 4 or out.shape[0] not in (1, batch) or out.shape[-1] != seq:
            return False
        kept = np.broadcast_to(keep[:, None, None, :], (batch, out.shape[1], out.shape[2], seq))
        full = np.broadcast_to(out, kept.shape)
        if not (np.all(full[kept] == 0) and np.all(full[~kept] <= _MASKED)):
            return False
    return True


def attention_on_mask_index(model: Any) -> int:
    """Rewrites, in place, each com.microsoft Attention whose only extra input is an attention bias
    that is the padding mask of a graph input, to take that mask as its mask index instead (and
    drops `qkv_hidden_sizes` when the three are equal, its default). Returns how many it rewrote."""
    from onnx import TensorProto, helper

    nodes = [n for n in model.graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"]
    candidates = [n for n in nodes if len(n.input) == 6 and not any(n.input[3:5]) and n.input[5]]
    verdict: dict[str, str | None] = {}
    rewritten = 0
    for node in candidates:
        bias = node.input[5]
        if bias not in verdict:
            mask = _padding_mask_input(model, bias)
            verdict[bias] = mask if mask is not None and is_padding_bias(model, bias, mask) else None
        mask = verdict[bias]
        sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), [])
        if mask is None or len(set(sizes)) > 1:
            continue
        index = f"{MASK_INDEX}_{mask}"  # one int32 cast per mask input, made once
        if not any(index in n.output for n in model.graph.node):
            model.graph.node.insert(0, helper.make_node("Cast", [mask], [index], to=TensorProto.INT32, name=index))
        inputs = [*node.input[:3], index]
        del node.input[:]
        node.input.extend(inputs)
        attributes = [a for a in node.attribute if a.name != "qkv_hidden_sizes"]
        del node.attribute[:]
        node.attribute.extend(attributes)
        rewritten += 1
    return rewritten


def unfused(counts: collections.Counter[str], quantized: bool) -> list[str]:
    """What the recipe could not fuse, read off the engine's graph: attention left as its parts,
    and (int8-dynamic) attention left in floating point because it takes a bias, not a mask index."""
    lost = []
    if counts["Softmax"]:
        lost.append(f"{counts['Softmax']} attention softmax(es) left unfused")
    if quantized and counts["Attention"]:
        lost.append(f"{counts['Attention']} Attention left in floating point (QAttention takes a mask index; "
                    "this graph's attention bias is not only the padding mask)")
    return lost
