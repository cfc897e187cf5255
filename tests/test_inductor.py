"""Inductor's in-memory engine is what its options say: freezing=true folds the weights and
pre-packs them for the CPU's matrix-product libraries, read off the code Inductor generates."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import backends as registry
from pipeline.capture import Captured
from pipeline.inputs import Shape, make_inputs
from pipeline.models import ModelBundle
from pipeline.precision import Precision


@pytest.mark.parametrize("freezing", [True, False])
def test_freezing_reaches_the_in_memory_compile(freezing: bool, tiny_captured: Captured, tiny_bert: ModelBundle) -> None:
    torch._dynamo.reset()
    engine = registry.get("inductor").compile(tiny_captured, Precision.FP32, "cpu", {"freezing": freezing})
    x = make_inputs(tiny_bert, Shape(2, 8), "text")
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit generates no code to read
        outputs, code = run_and_get_code(engine, x)
    packed = "mkl" in "\n".join(code)  # a frozen linear is a packed oneDNN/MKL call, not an addmm on a graph input
    assert packed is freezing
    with torch.no_grad():
        ref = tiny_bert.module(**x)
    assert torch.allclose(outputs[tiny_bert.output_names[0]], ref[0], atol=1e-4)
