"""Every registered backend through the same contract on a tiny BERT: compile, run, compare, describe,
save, reload. A backend that cannot run here is a skip that names its reason. "Every registered"
includes a backend from outside the package, registered through the `kiln.backends` entry-point
group (tests/plugin_backend.py, declared by conftest.py)."""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch

import backends as registry
from backends.base import CompiledModel
from pipeline.errors import ArtifactError, InputError, ShapeError
from pipeline import manifest
from pipeline.env import cpu_flags
from pipeline.inputs import Shape, make_inputs
from pipeline.manifest import Manifest
from pipeline.precision import Precision
from pipeline.references import References

SHAPES = (Shape(1, 16), Shape(3, 24))
# scripts/gpu_check.sh runs this suite on cuda; by default it runs on the CPU
DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")
# The contract, not the tuning: TVM's MetaSchedule takes minutes even on a tiny BERT and is
# tested on its own in test_tvm.py.
FAST = {"tvm": {"trials_per_task": 0}}
_engines: dict[tuple[str, Precision], CompiledModel] = {}


def _available(name: str) -> Any:
    b = registry.get(name)
    a = b.availability(DEVICE)
    if not a:
        pytest.skip(f"{name}: {a}")
    return b


def _engine(name: str, precision: Precision, captured: Any) -> CompiledModel:
    if (name, precision) not in _engines:
        support = _available(name).supports(precision, DEVICE)
        if not support:  # this host lacks what the precision needs (a CPU without fp16 arithmetic)
            pytest.skip(f"{name} {precision}: {support.reason}")
        _engines[(name, precision)] = _available(name).compile(captured, precision, DEVICE, FAST.get(name), SHAPES)
    return _engines[(name, precision)]


_refs: dict[Precision, References] = {}


def _on(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(DEVICE) for k, v in x.items()}


def _verdict(model: CompiledModel, captured: Any, precision: Precision) -> Any:
    if precision not in _refs:  # the same references the runner computes: text, random and padded batches
        _refs[precision] = References.compute(captured.bundle, SHAPES, [precision])
    return _refs[precision].judge(model, SHAPES, precision)


BACKENDS = registry.names()  # every registered backend; one that cannot run here skips, naming why


@pytest.mark.parametrize("name", BACKENDS)
def test_fp32_engine_matches_eager(name: str, tiny_captured: Any) -> None:
    model = _engine(name, Precision.FP32, tiny_captured)
    assert model.backend == name and model.output_names == ("last_hidden_state",)
    verdict = _verdict(model, tiny_captured, Precision.FP32)
    assert verdict.passed, verdict.reason
    assert verdict.outputs[0].agreement == 1.0  # nearest-neighbour ranking of the 3 sentences kept
    info = model.describe()
    assert info["build_s"] >= 0


@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "inductor"])  # Inductor fp16 on CPU: a slow compile, checked by kiln run
def test_fp16_engine_within_fp16_tolerance(name: str, tiny_captured: Any) -> None:
    model = _engine(name, Precision.FP16, tiny_captured)
    verdict = _verdict(model, tiny_captured, Precision.FP16)
    assert verdict.passed, verdict.reason
    assert verdict.outputs[0].max_abs > 1e-5  # it really ran in fp16


@pytest.mark.parametrize("name", BACKENDS)
def test_missing_input_is_a_clear_error(name: str, tiny_captured: Any) -> None:
    model = _engine(name, Precision.FP32, tiny_captured)
    with pytest.raises(InputError, match="missing input.*attention_mask"):
        model({"input_ids": torch.zeros(1, 4, dtype=torch.int64, device=DEVICE)})


@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "inductor"])  # AOTInductor has its own test below
def test_save_and_load_give_the_same_outputs(name: str, tiny_captured: Any, tmp_path: Path) -> None:
    model = _engine(name, Precision.FP32, tiny_captured)
    files = model.save(tmp_path / "e")
    assert all(f.is_file() for f in files)
    loaded = registry.get(name).load(tmp_path / "e", DEVICE)
    x = _on(make_inputs(tiny_captured.bundle, Shape(2, 20), "padded"))
    assert torch.allclose(loaded(x)["last_hidden_state"], model(x)["last_hidden_state"], atol=1e-6)


def test_aotinductor_package_reloads(tiny_captured: Any, tmp_path: Path) -> None:
    model = _engine("inductor", Precision.FP32, tiny_captured)
    model.save(tmp_path / "e")
    loaded = registry.get("inductor").load(tmp_path / "e", DEVICE)
    for s in (Shape(1, 16), Shape(4, 40)):  # dynamic batch and seq survive packaging
        x = _on(make_inputs(tiny_captured.bundle, s, "padded"))
        assert torch.allclose(loaded(x)["last_hidden_state"], model(x)["last_hidden_state"], atol=1e-5)


def test_load_refuses_a_foreign_engine(tiny_captured: Any, tmp_path: Path) -> None:
    _engine("eager", Precision.FP32, tiny_captured).save(tmp_path / "e")
    with pytest.raises(ArtifactError, match="is a 'eager' engine, not 'onnxruntime'"):
        registry.get("onnxruntime").load(tmp_path / "e")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        registry.get("eager").load(tmp_path / "nothing")


def test_an_engine_saved_by_an_older_kiln_is_refused_clearly(tiny_captured: Any, tmp_path: Path) -> None:
    _engine("eager", Precision.FP32, tiny_captured).save(tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "manifest.json").read_text())
    (tmp_path / "e" / "manifest.json").write_text(json.dumps({**meta, "schema_version": 1}))
    with pytest.raises(ArtifactError, match=r"built by an older Kiln \(schema 1\), rebuild it"):
        registry.get("eager").load(tmp_path / "e")
    old = tmp_path / "old"  # schema 1's --save-engines: engine.json beside the files, no manifest
    old.mkdir()
    (old / "engine.json").write_text(json.dumps({"backend": "eager", "precision": "fp32"}))
    with pytest.raises(ArtifactError, match=r"built by an older Kiln \(schema 1"):
        registry.get("eager").load(old)


def test_the_manifest_is_one_typed_record(tiny_captured: Any, tmp_path: Path) -> None:
    _engine("eager", Precision.FP32, tiny_captured).save(tmp_path / "e")
    m = manifest.read(tmp_path / "e")
    assert m.backend == "eager" and m.precision is Precision.FP32 and "program.pt2" in m.files and m.engine["inputs"]
    assert not m.built and m.status == "pass"  # saved by a run, not built: no verdict to show
    assert Manifest.from_dict(m.to_dict()) == m  # the dict form round-trips
    raw = json.loads((tmp_path / "e" / "manifest.json").read_text())
    for edit, says in (({"schema_version": 2}, r"built by an older Kiln \(schema 2\), rebuild it"),
                       ({"extra": 1}, "unknown field\\(s\\) extra"), ({"requires": "torch"}, "'requires' is 'torch', not a dict"),
                       ({"precision": "fp8"}, "unknown precision 'fp8'"), ({"verdict": {"status": "pass", "why": "x"}}, "unknown field"),
                       ({"tokenizer": "tok.json"}, "not a list")):
        manifest.rewrite(tmp_path / "e", {**raw, **edit})  # resealed, as whoever rewrites a manifest on purpose can
        with pytest.raises(ArtifactError, match=says):
            registry.get("eager").load(tmp_path / "e")


def test_a_backend_from_an_entry_point_is_registered_and_conformant() -> None:
    declared = {ep.name: ep.value for ep in entry_points(group="kiln.backends")}
    assert declared.get("exported-program") == "plugin_backend:ExportedProgramBackend"
    assert "exported-program" in BACKENDS  # so every test above ran it
    assert type(registry.get("exported-program")).__module__ == "plugin_backend"


@pytest.mark.parametrize("name", BACKENDS)
def test_inputs_are_checked_at_the_engines_door(name: str, tiny_captured: Any, tmp_path: Path) -> None:
    model = _engine(name, Precision.FP32, tiny_captured)
    model.save(tmp_path / "e")
    loaded = registry.get(name).load(tmp_path / "e", DEVICE)  # the door is kept in the manifest, not only in memory
    x = _on(make_inputs(tiny_captured.bundle, Shape(2, 16), "padded"))
    vocab = tiny_captured.bundle.inputs["input_ids"].high
    for engine in (model, loaded):
        oov = {**x, "input_ids": x["input_ids"].clone().fill_(vocab)}
        with pytest.raises(InputError, match=f"valid values are 0 to {vocab - 1}"):
            engine(oov)
        with pytest.raises(InputError, match="is int32, expected int64"):
            engine({**x, "input_ids": x["input_ids"].int()})
        with pytest.raises(InputError, match="has 1 dims"):
            engine({**x, "input_ids": x["input_ids"][0]})
        with pytest.raises(ShapeError, match="seq 300 is outside the built range"):
            engine({k: torch.ones(1, 300, dtype=torch.int64, device=DEVICE) for k in x})
        with pytest.raises(ShapeError, match="batch is 2 in 'input_ids' but 1 in 'attention_mask'"):
            engine({**x, "attention_mask": x["attention_mask"][:1]})


def _int8_refs(captured: Any, precision: Precision) -> References:
    if precision not in _refs:  # the int8 reference is eager PT2E, as the runner makes it
        _refs[precision] = References.compute(
            captured.bundle, SHAPES, [precision],
            quantized=lambda p: registry.get("eager").compile(captured, p, "cpu", None, SHAPES))
    return _refs[precision]


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.INT8_DYNAMIC])
@pytest.mark.parametrize("name", [n if n != "inductor" else pytest.param(n, marks=pytest.mark.slow) for n in BACKENDS])  # its compile: ~40 s
def test_int8_engine_keeps_the_task_or_says_why_not(name: str, precision: Precision, tiny_captured: Any, tmp_path: Path) -> None:
    backend = _available(name)
    support = backend.supports(precision, DEVICE)
    if not support:  # a refusal is a row that names its reason, never an attempt
        assert len(support.reason) > 20 and (precision not in backend.precisions or DEVICE != "cpu")
        return
    model = _engine(name, precision, tiny_captured)
    verdict = _int8_refs(tiny_captured, precision).judge(model, SHAPES, precision)
    assert verdict.passed, verdict.reason
    out = verdict.outputs[0]
    assert out.judged_by == "task" and out.embedding_cosine is not None and out.embedding_cosine >= out.min_cosine >= 0.95
    assert out.max_abs > 1e-4  # it really ran quantized
    files = {f.name for f in model.save(tmp_path / "e")}
    meta = json.loads((tmp_path / "e" / "manifest.json").read_text())
    quant = meta["engine"]["quantization"]
    assert quant["per_channel"] is True and "weights int8 per channel" in model.spec.quantization_text  # data; prose derived
    if precision == Precision.INT8 and not backend.calibrates:  # its own quantizer's ranges: no file of Kiln's would be true
        assert "calibration.json" not in files and quant["activations"] == "static" and model.spec.calibration is None
    elif precision == Precision.INT8:  # the calibration travels with the engine, hashed like its other files
        assert "calibration.json" in files and "calibration.json" in meta["files"]
        assert quant["calibration_digest"] == model.spec.calibration.digest and quant["method"] == tiny_captured.quant.method
    else:
        assert "calibration.json" not in files and quant["activations"] == "dynamic"
    loaded = backend.load(tmp_path / "e", DEVICE)
    assert _int8_refs(tiny_captured, precision).judge(loaded, SHAPES, precision).passed  # what ships keeps the task too
    x = _on(make_inputs(tiny_captured.bundle, Shape(2, 20), "text"))
    # Without int8 dot-product instructions (VNNI) oneDNN's int8 kernels, which Inductor's in-memory
    # engine calls, round differently from the AOTInductor package, which matches eager PT2E to 5e-7:
    # on a Zen 3 host the two engines differed by 5.9e-3 where either differs from fp32 by 5.5e-3.
    vnni = bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
    atol = 1e-4 if vnni or DEVICE != "cpu" else max(1e-4, 2 * out.max_abs)
    assert torch.allclose(loaded(x)["last_hidden_state"], model(x)["last_hidden_state"], atol=atol)
