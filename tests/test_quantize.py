"""int8: the calibration set, the calibration file, one calibration for every backend, the task
verdict, and bad input (unknown method, too few samples, NaN, nothing to quantize, refusals)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import backends as registry
from backends.quantize import calibrate, fx_linear_keys, onnx_linear_inputs, pt2e
from backends.tensorrt.builder import precision_flags
from pipeline.calibration import BATCH, Calibration, Layer, QuantSpec, calibration_batches, calibration_sentences, check_finite
from pipeline.capture import Captured, capture
from pipeline.cli import main
from pipeline.compare import Comparator
from pipeline.config import make_config
from pipeline.errors import InputError, NumericsError
from pipeline.inputs import Shape, sentences
from pipeline.models import ModelBundle
from pipeline.precision import INT8_FLOOR, Precision
from pipeline.references import References


@pytest.fixture(scope="module")
def quantized(tiny_bert: ModelBundle, cache_dir: Path) -> Captured:
    return capture(tiny_bert, cache_dir, QuantSpec(method="minmax", samples=16))


def test_calibration_sentences_are_never_evaluation_sentences() -> None:
    cal, ev = calibration_sentences(), sentences()
    assert len(cal) >= 64 and not set(cal) & set(ev)


def test_calibration_batches_are_seeded_and_sized(tiny_bert: ModelBundle) -> None:
    spec = QuantSpec(samples=20, seq=32)
    a, b = calibration_batches(tiny_bert, spec), calibration_batches(tiny_bert, spec)
    assert [x["input_ids"].shape for x in a] == [torch.Size([8, 32]), torch.Size([8, 32]), torch.Size([4, 32])]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    other = calibration_batches(tiny_bert, dataclasses.replace(spec, seed=1))
    assert not torch.equal(a[0]["input_ids"], other[0]["input_ids"])


@pytest.mark.parametrize("bad, message", [
    ({"method": "kl"}, "unknown calibration method 'kl'; valid: minmax, percentile, entropy, histogram"),
    ({"samples": BATCH - 1}, "smaller than one batch"),
])
def test_bad_quantization_settings_are_refused(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        QuantSpec(**bad)
    with pytest.raises(InputError, match="unknown quantization setting"):
        make_config(backends="eager", quant={"mehtod": "minmax"})


def test_more_samples_than_the_calibration_pool_is_refused(tiny_bert: ModelBundle) -> None:
    with pytest.raises(InputError, match="calibration sentences"):
        calibration_batches(tiny_bert, QuantSpec(samples=10_000))


def test_nan_in_calibration_data_or_ranges_is_refused() -> None:
    with pytest.raises(InputError, match="NaN or Inf"):
        check_finite([{"pixel_values": torch.tensor([1.0, math.nan])}])
    with pytest.raises(NumericsError, match="NaN or Inf inside the model"):
        Calibration(QuantSpec(), "g", (Layer("a#0", "linear", "x", math.nan, 1.0),), 8)


@pytest.mark.parametrize("argv", [["--calibration", "kl"], ["--calibration-samples", "3"]])
def test_cli_bad_calibration_is_one_line_exit_2_nothing_written(argv: list[str], tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "run"
    code = main(["run", "--model", "tiny-bert", "--backends", "eager", "--precisions", "int8", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("kiln: ") and not out.exists()


class _NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm = nn.Embedding(50, 8), nn.LayerNorm(8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.emb(input_ids))


def test_a_model_with_nothing_to_quantize_is_refused_before_anything_is_written(tmp_path: Path, capsys: Any) -> None:
    from pipeline.build import run

    bundle = ModelBundle.from_module(_NoLinear(), {"input_ids": torch.randint(0, 50, (2, 8))}, name="no-linear",
                                     dynamic_axes={"input_ids": {0: "batch", 1: "seq"}})
    with pytest.raises(InputError, match="no quantizable layers"):
        run(bundle, out=tmp_path / "run", backends="eager", precisions="int8", shapes="2x8", isolation="none")
    assert not (tmp_path / "run").exists()


def test_one_calibration_keys_the_onnx_graph_and_the_captured_program_alike(quantized: Captured) -> None:
    """The calibration is computed on the ONNX export; PT2E finds each range by the layer's key in
    the captured program. With minmax, PT2E's own min/max observers over the same batches must
    land on the same ranges: the proof that every key points at the same tensor."""
    import onnx
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from backends.quantize import _quantizer

    calibration = calibrate(quantized)
    onnx_keys = [k for k, *_ in onnx_linear_inputs(onnx.load(str(quantized.onnx_path()), load_external_data=False))]
    gm = quantized.program.module()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    keys = fx_linear_keys(gm)
    assert sorted(onnx_keys) == sorted(keys.values()) == sorted(calibration.by_key())
    assert len(keys) == 12  # 2 layers x (q, k, v, attention output, intermediate, output)
    prepared = prepare_pt2e(gm, _quantizer(Precision.INT8, quantized.quant))
    with torch.no_grad():
        for batch in calibration_batches(quantized.bundle, quantized.quant):
            prepared(**batch)
    by_name, by_key, checked = {n.name: k for n, k in keys.items()}, calibration.by_key(), 0
    for node in prepared.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("activation_post_process") and node.args[0].op != "get_attr":
            obs = getattr(prepared, str(node.target))
            for user in node.users:
                layer = by_key[by_name[user.name]]
                assert float(obs.min_val) == pytest.approx(layer.low, rel=1e-5, abs=1e-6)
                assert float(obs.max_val) == pytest.approx(layer.high, rel=1e-5, abs=1e-6)
                checked += 1
    assert checked == 12


def test_the_calibration_file_is_checked(quantized: Captured, tmp_path: Path) -> None:
    calibration = calibrate(quantized)
    path = calibration.save(tmp_path / "calibration.json")
    assert Calibration.load(path) == calibration and Calibration.load(path).digest == calibration.digest
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something-else", "schema": 1}))
    with pytest.raises(InputError, match="not a Kiln calibration file"):
        Calibration.load(tmp_path / "other.json")
    (tmp_path / "cut.json").write_text(path.read_text()[:100])
    with pytest.raises(InputError, match="cannot read the calibration file"):
        Calibration.load(tmp_path / "cut.json")


def test_a_changed_calibration_file_in_an_artifact_is_refused(quantized: Captured, tmp_path: Path) -> None:
    from pipeline.errors import ArtifactError

    engine = registry.get("eager").compile(quantized, Precision.INT8, "cpu")
    engine.save(tmp_path / "e")
    cal = json.loads((tmp_path / "e" / "calibration.json").read_text())
    cal["layers"][0]["high"] *= 2
    (tmp_path / "e" / "calibration.json").write_text(json.dumps(cal))
    with pytest.raises(ArtifactError, match="calibration.json"):
        registry.get("eager").load(tmp_path / "e")


def test_int8_is_judged_by_the_task_not_elementwise() -> None:
    torch.manual_seed(0)
    ref = torch.randn(4, 16, 128)
    mask = torch.ones(4, 16, dtype=torch.int64)
    noisy = ref + 0.05 * torch.randn_like(ref)
    noisy[0, 0, 0] += 3.0  # one outlier element far beyond any elementwise tolerance
    comp = Comparator(Precision.INT8, "encoder")
    comp.add({"h": noisy}, {"h": ref}, {"h": ref.double()}, {"h": ref + 0.05 * torch.randn_like(ref)}, mask)
    verdict = comp.result()
    assert verdict.passed, verdict.reason
    m = verdict.outputs[0]
    assert m.judged_by == "task" and m.violations >= 1 and "reported, not judged" in m.reason
    # Scrambled embeddings: the task is lost, whatever the reference did, never looser than the floor.
    comp = Comparator(Precision.INT8, "encoder")
    comp.add({"h": torch.randn_like(ref)}, {"h": ref}, {"h": ref.double()}, {"h": torch.randn_like(ref)}, mask)
    bad = comp.result()
    assert not bad.passed and "sentence-embedding cosine" in bad.reason
    assert bad.outputs[0].min_cosine == INT8_FLOOR.min_cosine


def test_backends_that_cannot_do_int8_say_why() -> None:
    tvm, trt, ttrt = (registry.get(n) for n in ("tvm", "tensorrt", "torch-tensorrt"))
    assert "quantized_decomposed.quantize_per_tensor" in tvm.supports(Precision.INT8, "cpu").reason
    assert "FP8/FP4" in trt.supports(Precision.INT8_DYNAMIC, "cuda").reason
    assert trt.supports(Precision.INT8, "cuda")
    assert "ModelOpt" in ttrt.supports(Precision.INT8, "cuda").reason
    assert precision_flags(Precision.INT8, False) == (["STRONGLY_TYPED"], [])
    for name in ("eager", "inductor"):  # PT2E's x86 quantizer: oneDNN CPU kernels
        assert registry.get(name).supports(Precision.INT8, "cpu")
        assert "CPU only" in registry.get(name).supports(Precision.INT8_DYNAMIC, "cuda").reason


def test_tvm_still_lacks_the_qdq_converter() -> None:
    """The TVM refusal is a fact about TVM 0.27's importer: when a TVM release adds the converter,
    this fails and the refusal should go."""
    pytest.importorskip("tvm")
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    convert = ExportedProgramImporter().create_convert_map()
    assert len(convert) > 100 and not [k for k in convert if "quantize" in k]


def test_qdq_graph_quantizes_exactly_the_calibrated_layers(quantized: Captured, tmp_path: Path) -> None:
    import onnx

    from backends.quantize import qdq_onnx

    qdq_onnx(quantized, tmp_path, symmetric=True)
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    q = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    calibrated = {layer.tensor for layer in calibrate(quantized).layers}
    assert {n.input[0] for n in q} == calibrated  # activations only: weights are stored int8 already
    zero_points = {i.name: i for i in graph.initializer}
    for n in q:  # symmetric: TensorRT takes int8 with zero point 0 only
        zp = onnx.numpy_helper.to_array(zero_points[n.input[2]])
        assert zp.dtype.name == "int8" and not zp.any()


@pytest.mark.parametrize("name", ["eager", pytest.param("inductor", marks=pytest.mark.slow), "onnxruntime"])
def test_per_tensor_weights(name: str, tiny_bert: ModelBundle, cache_dir: Path, tmp_path: Path) -> None:
    captured = capture(tiny_bert, cache_dir, QuantSpec(method="minmax", samples=16, per_channel=False))
    backend = registry.get(name)
    engine = backend.compile(captured, Precision.INT8, "cpu")
    verdict = References.compute(tiny_bert, [Shape(3, 24)], [Precision.INT8],
                                 quantized=lambda p: registry.get("eager").compile(captured, p, "cpu")).judge(engine, [Shape(3, 24)], Precision.INT8)
    assert verdict.passed, verdict.reason
    engine.save(tmp_path / "e")
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["engine"]["quantization"]["per_channel"] is False


def test_the_int8_reference_is_quantized_once_per_run(tiny_bert: ModelBundle, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager int8 engine the references are computed with is the one its own row checks and times."""
    import backends.quantize as quantize
    from pipeline.runner import Runner

    calls: list[Precision] = []
    real = quantize.pt2e
    monkeypatch.setattr(quantize, "pt2e", lambda captured, p: calls.append(p) or real(captured, p))
    cfg = make_config(backends="eager", precisions="int8", shapes="2x16", device="cpu", rounds=1, warmup=0,
                      isolation="none", quant={"samples": 16})
    runner = Runner(tiny_bert, cfg, cache_dir=cache_dir)
    report = runner.run()
    runner.close()
    assert calls == [Precision.INT8] and report.find("eager", "int8", "2x16").status == "ok"


def test_a_failing_int8_reference_fails_its_precision_only(tiny_bert: ModelBundle, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantizer that raises on a model (PT2E int8-dynamic on GPT-2's forward graph: "Expecting
    input to have dtype torch.float32/16/b16, but got dtype: torch.int64") costs the rows at that
    precision, each saying why, never the run and its other rows."""
    from backends.eager import EagerModel
    from pipeline.runner import Runner

    real = EagerModel.run

    def run(self: EagerModel, inputs: Any) -> Any:
        if self.precision == Precision.INT8_DYNAMIC:
            raise AssertionError("Expecting input to have dtype torch.float32/16/b16, but got dtype: torch.int64")
        return real(self, inputs)

    monkeypatch.setattr(EagerModel, "run", run)
    cfg = make_config(backends="eager,onnxruntime", precisions="fp32,int8-dynamic", shapes="2x16", device="cpu", rounds=1,
                      warmup=0, isolation="none")
    runner = Runner(tiny_bert, cfg, cache_dir=cache_dir)
    report = runner.run()
    runner.close()
    assert all(report.find(name, "fp32", "2x16").status == "ok" for name in ("eager", "onnxruntime"))
    eager, ort = report.find("eager", "int8-dynamic", "2x16"), report.find("onnxruntime", "int8-dynamic", "2x16")
    assert eager.status == "failed" and eager.reason.startswith("AssertionError: Expecting input")  # its own call, first
    assert ort.status == "failed" and ort.reason.startswith(
        "nothing at int8-dynamic can be judged: the eager int8-dynamic reference failed on tiny-bert: AssertionError: Expecting")


def test_a_loaded_int8_dynamic_engine_keeps_its_weight_scheme(tiny_bert: ModelBundle, cache_dir: Path, tmp_path: Path) -> None:
    captured = capture(tiny_bert, cache_dir, QuantSpec(samples=16, per_channel=False))
    registry.get("eager").compile(captured, Precision.INT8_DYNAMIC, "cpu").save(tmp_path / "e")
    loaded = registry.get("eager").load(tmp_path / "e")
    assert loaded.spec.quantization()["per_channel"] is False  # saved again, it would say the same
    assert "weights int8 per tensor" in loaded.spec.quantization_text
