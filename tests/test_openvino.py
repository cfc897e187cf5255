"""The OpenVINO backend beyond the conformance suite: the plugin's arithmetic is always the one
asked (its default would be bf16 on a bf16 CPU), a CPU without the arithmetic is refused before any
work, bf16 crosses the numpy boundary by its bits, NNCF's int8 carries no calibration file of
Kiln's, Triton serves it by backend name, and generation builds, ships and loads back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import backends as registry
from pipeline.build import build, run
from pipeline.calibration import QuantSpec
from pipeline.errors import BackendError
from pipeline.inputs import Shape, make_inputs
from pipeline.precision import Precision

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from backends import openvino as ov_backend  # noqa: E402

BF16 = bool(ov_backend.cpu_flags() & set(ov_backend.UNITS["bf16"]))


def test_every_engine_runs_the_arithmetic_asked_for(tiny_captured: Any) -> None:
    b = registry.get("openvino")
    fp32 = b.compile(tiny_captured, Precision.FP32, "cpu")
    assert fp32.describe()["plugin"]["INFERENCE_PRECISION_HINT"] == "f32"  # set, not the plugin's default
    assert fp32.notes() == ["inference precision f32"]
    assert sum(fp32.describe()["runtime_ops"].values()) > 0  # what the plugin's fusions left, by layer type
    opts = b.options({"inference_precision": "bf16"})
    if not BF16:
        with pytest.raises(BackendError, match="no bf16 arithmetic"):
            b.compile(tiny_captured, Precision.FP32, "cpu", opts)
        return
    mixed = b.compile(tiny_captured, Precision.FP32, "cpu", opts)  # an fp32 IR run in bf16, as the option says
    x = make_inputs(tiny_captured.bundle, Shape(2, 12), "padded")
    diff = (mixed(x)["last_hidden_state"] - fp32(x)["last_hidden_state"]).abs().max().item()
    assert 1e-4 < diff < 0.5 and mixed.describe()["plugin"]["INFERENCE_PRECISION_HINT"] == "bf16"


def test_a_cpu_without_the_arithmetic_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    b = registry.get("openvino")
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: {"avx2", "fma"})  # a Zen 3 host
    for p in (Precision.BF16, Precision.FP16):
        refusal = b.refusal(p, "cpu")
        assert refusal is not None and refusal[0] == "unsupported"
        assert f"no {'bf16' if p == Precision.BF16 else 'f16'} arithmetic" in refusal[1]
    assert b.refusal(Precision.FP32, "cpu") is None and b.refusal(Precision.INT8, "cpu") is None
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: {"avx512_bf16"})
    assert b.refusal(Precision.BF16, "cpu") is None and b.refusal(Precision.FP16, "cpu") is not None
    assert b.refusal(Precision.FP32, "cuda") == ("unavailable", b.availability("cuda").reason)


def test_a_query_that_attends_to_nothing_is_finite() -> None:
    """A left pad's row of a boolean mask is all False: OpenVINO's boolean SDPA answers NaN there
    (recorded, so the day it stops this test says so), which the pads' values would carry to every
    real token; with the mask made additive the other rows are torch's to 1e-6."""
    import openvino as ov

    class Attend(torch.nn.Module):
        def forward(self, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    q = torch.randn(1, 2, 4, 8)
    mask = torch.tensor([[False] * 4, [True, False, False, False], [True, True, False, False], [True, True, True, False]])
    mask = mask.reshape(1, 1, 4, 4).expand(1, 2, 4, 4).contiguous()
    program = torch.export.export(Attend(), (q, mask))
    core = ov.Core()

    def answer(model: Any) -> torch.Tensor:
        return torch.from_numpy(core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})([q.numpy(), mask.numpy()])[0])

    assert torch.isnan(answer(ov.convert_model(program))[0, :, 0]).all()  # OpenVINO's own answer
    model = ov.convert_model(program)
    assert ov_backend._finite_masks(model) == 1
    out = answer(model)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, :, 1:], Attend()(q, mask)[0, :, 1:], atol=1e-6)


def test_bf16_tensors_cross_by_their_bits() -> None:
    x = torch.randn(3, 5).to(torch.bfloat16)
    import openvino as ov

    t = ov_backend._tensor(x)
    assert t.element_type == ov.Type.bf16
    back = ov_backend._torch(t)
    assert back.dtype == torch.bfloat16 and torch.equal(back, x)
    assert ov_backend._torch(ov.Tensor(ov_backend._tensor(torch.arange(4)))).tolist() == [0, 1, 2, 3]


def test_int8_is_nncfs_own_calibration_said_as_data(tiny_captured: Any, tmp_path: Path) -> None:
    model = registry.get("openvino").compile(tiny_captured, Precision.INT8, "cpu")
    assert model.spec.calibration is None  # NNCF estimates the ranges: no calibration.json of Kiln's would be true
    files = {f.name for f in model.save(tmp_path / "e")}
    assert files >= {"openvino_model.xml", "openvino_model.bin", "manifest.json"} and "calibration.json" not in files
    meta = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert meta["engine"]["quantization"]["activations"] == "static" and "nncf.quantize" in meta["engine"]["quantizer"]
    assert "estimated by openvino's quantizer (minmax, 64 samples)" in model.spec.quantization_text
    loaded = registry.get("openvino").load(tmp_path / "e")
    x = make_inputs(tiny_captured.bundle, Shape(2, 20), "text")
    assert torch.equal(loaded(x)["last_hidden_state"], model(x)["last_hidden_state"])
    assert "nncf.quantize" in loaded.notes()[0]
    entropy = dataclasses.replace(tiny_captured, quant=QuantSpec(method="entropy"), calibrations={})
    with pytest.raises(BackendError, match="no entropy range estimator"):
        registry.get("openvino").compile(entropy, Precision.INT8, "cpu")


def test_triton_serves_it_by_backend_name(tmp_path: Path, cache_dir: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    from pipeline.triton import export_triton

    [outcome] = build("tiny-bert", "openvino", "fp32", shapes="1x16,2x24", root=tmp_path / "a", cache_dir=cache_dir,
                      warmup=1, rounds=2)
    assert outcome.status == "built", outcome.reason
    model_dir = export_triton(outcome.path, tmp_path / "repo", name="ovbert")
    assert {p.name for p in (model_dir / "1").iterdir()} == {"model.xml", "model.bin"}  # the names Triton's openvino backend reads
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig())
    assert cfg.backend == "openvino" and cfg.platform == "" and cfg.max_batch_size == 64


@pytest.mark.skipif(not BF16, reason="this CPU has no bf16 arithmetic")
def test_generation_at_fp32_and_bf16_keeps_eagers_tokens() -> None:
    report = run("tiny-gpt2", mode="generate", backends="openvino", precisions="fp32,bf16", shapes="1x8,2x8", device="cpu",
                 isolation="none", new_tokens=6, rounds=1)
    rows = [r for r in report.results if r.backend == "openvino"]
    assert len(rows) == 4 and all(r.status == "ok" for r in rows), [(r.precision, r.status, r.reason) for r in rows]
    assert all(r.agreement == 1.0 for r in rows if r.precision == Precision.FP32)
    assert all("inference precision bf16" in r.reason for r in rows if r.precision == Precision.BF16)
