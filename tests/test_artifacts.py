"""Deployable engines: build, reuse, refuse tampered/truncated/foreign ones, atomic writes, load in a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import backends as registry
from helpers import keys
from backends.base import BackendOptions
from backends.eager import EagerBackend, EagerModel
from pipeline import manifest, store
from pipeline.build import build
from pipeline.manifest import MANIFEST, Manifest
from pipeline.store import check_artifact, load, verify
from pipeline.cli import main
from pipeline.errors import ArtifactError, InputError
from pipeline.precision import Precision
from pipeline.triton import config_pbtxt, export_triton

ROOT_ARGS: dict[str, Any] = dict(precisions="fp32", shapes="1x16,2x24", device="cpu", warmup=1, rounds=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    out = build("tiny-bert", "eager,onnxruntime", root=root, cache_dir=cache_dir, **ROOT_ARGS)
    assert [(o.backend, o.status) for o in out] == [("eager", "built"), ("onnxruntime", "built")]
    return root / "tiny-bert"


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_manifest_records_what_a_deployment_needs(built: Path) -> None:
    meta = check_artifact(built / "onnxruntime-fp32").to_dict()
    assert meta["model"]["name"] == "tiny-bert" and len(meta["model"]["graph_hash"]) == 16
    assert meta["inputs"]["input_ids"] == {"dtype": "int64", "dims": ["batch", "seq"], "high": 30522}
    assert meta["outputs"]["last_hidden_state"] == {"dims": ["batch", "seq", 32], "dtype": "float32"}
    assert meta["axis_ranges"] == {"batch": [1, 64], "seq": [1, 256]}
    assert meta["tokenizer"] == ["tokenizer.json", "tokenizer_config.json"]  # the tokenizer travels with the engine
    assert set(meta["files"]) == {"model.onnx", "model.onnx.data", "reference.pt", *meta["tokenizer"]}  # one manifest, no other metadata file
    assert meta["requires"]["onnxruntime"] and meta["device"]["type"] == "cpu"
    assert meta["verdict"]["status"] == "pass" and meta["benchmark"]["2x24"]["speedup"] > 0
    # the verdict and speed are those of the saved files, loaded back, at every shape and input kind
    assert meta["verdict"]["engine"].startswith("saved engine loaded from")
    assert {s: v["verdict"] for s, v in meta["verdict"]["shapes"].items()} == {"1x16": "pass", "2x24": "pass"}
    assert all(v["batches"] == 3 for v in meta["verdict"]["shapes"].values())
    assert set(meta["verdict"]["shapes"]["2x24"]["tolerances"]["last_hidden_state"]) >= {"atol", "rtol", "min_cosine"}
    assert meta["benchmark"]["1x16"]["reference_median_ms"] > 0
    assert meta["build_options"] == {"fuse": True, "transformers_optimizer": True, "graph_optimization": "all"}


def test_kiln_build_prints_what_it_shipped(built: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Per engine and shape: status, verdict, the tolerance held to, the loaded engine's speed and
    where it lies (reused here: read from its manifest), and why an engine was not installed."""
    import re

    argv = ["build", "--model", "tiny-bert", "--backends", "eager,tensorrt", "--shapes", "1x16,2x24", "--root", str(built.parent),
            "--cache-dir", str(cache_dir), "--device", "cpu", "--warmup", "1", "--rounds", "2", "--quiet"]
    assert main(argv) == 1  # tensorrt cannot be built here
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| eager ")]
    assert [r.split(" | ")[3] for r in rows] == ["1x16", "2x24"], out
    assert all("| reused |" in r and "| pass | atol " in r and str(built / "eager-fp32") in r for r in rows), out
    assert all(re.search(r"\| \d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\) \|", r) for r in rows), out
    assert "- tensorrt fp32 unavailable: " in out
    assert main([*argv, "--json"]) == 1
    eager = json.loads(capsys.readouterr().out)[0]
    assert eager["status"] == "reused" and eager["path"] == str(built / "eager-fp32") and eager["size_mb"] > 0
    assert eager["shapes"]["1x16"]["verdict"] == "pass" and eager["shapes"]["2x24"]["speedup"] > 0


def test_second_build_reuses(built: Path, cache_dir: Path) -> None:
    stale = built / ".staging-999999999-x"  # a killed build's staging copy: cleaned by a build that only reuses too
    stale.mkdir()
    out = build("tiny-bert", "onnxruntime", root=built.parent, cache_dir=cache_dir, **ROOT_ARGS)
    assert [o.status for o in out] == ["reused"] and not stale.exists()
    changed = build("tiny-bert", "onnxruntime", root=built.parent, cache_dir=cache_dir,
                    options={"onnxruntime": {"graph_optimization": "basic"}}, **ROOT_ARGS)
    assert [o.status for o in changed] == ["built"]  # a build option changed: a new engine
    assert check_artifact(built / "onnxruntime-fp32").build_options["graph_optimization"] == "basic"


def test_verify_passes_on_a_good_engine(built: Path) -> None:
    c = verify(built / "eager-fp32")
    assert c.passed and c.batches == 6 and set(c.shapes) == {"1x16", "2x24"}  # every shape, every input kind
    assert main(["verify", str(built / "onnxruntime-fp32")]) == 0


def test_tampered_truncated_and_foreign_artifacts_are_refused(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eng = _copy(built / "onnxruntime-fp32", tmp_path / "a")
    data = bytearray((eng / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (eng / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx does not match its sha256"):
        load(eng)
    trunc = _copy(built / "eager-fp32", tmp_path / "b")
    (trunc / "program.pt2").write_bytes((trunc / "program.pt2").read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="program.pt2 does not match"):
        load(trunc)
    assert main(["load", str(trunc)]) == 2 and "tampered or truncated" in capsys.readouterr().err
    foreign = tmp_path / "c"
    foreign.mkdir()
    (foreign / MANIFEST).write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(ArtifactError, match="not a Kiln engine manifest"):
        load(foreign)
    (foreign / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupted"):
        load(foreign)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load(tmp_path)


def test_a_manifest_edited_by_hand_or_a_file_it_does_not_list_is_refused(built: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The manifest is sealed by its own digest, and the directory holds only what it lists: a
    removed input spec, a raised vocabulary bound or a tokenizer file dropped in (which changed what
    predict answered while verify passed) is refused by verify, load and predict."""
    edits = {"specs": lambda m: m["engine"].pop("input_specs"),
             "bound": lambda m: m["inputs"]["input_ids"].update(high=10**9)}
    for name, edit in edits.items():
        eng = _copy(built / "onnxruntime-fp32", tmp_path / name)
        meta = json.loads((eng / MANIFEST).read_text())
        edit(meta)
        (eng / MANIFEST).write_text(json.dumps(meta))
        for argv in (["verify", str(eng)], ["load", str(eng)], ["predict", str(eng), "a sentence"]):
            assert main(argv) == 2, (name, argv)
            assert "was changed after it was written" in capsys.readouterr().err, (name, argv)
    extra = _copy(built / "onnxruntime-fp32", tmp_path / "extra")
    (extra / "special_tokens_map.json").write_text(json.dumps({"unk_token": "[MASK]"}))
    for argv in (["verify", str(extra)], ["load", str(extra)], ["predict", str(extra), "a sentence"]):
        assert main(argv) == 2, argv
        assert "special_tokens_map.json is not in the manifest" in capsys.readouterr().err, argv
    (extra / "special_tokens_map.json").unlink()
    assert main(["verify", str(extra)]) == 0


def test_a_crafted_manifest_or_reference_is_one_line_even_when_resealed(built: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Whoever rewrites a manifest can seal it again (only a signature stops that): what it says is
    still checked field by field, and a crafted reference.pt is refused by weights_only, in one line."""
    import pickle

    crafted = {"precision": (lambda m: m.update(precision="fp8"), "unknown precision 'fp8'"),
               "device": (lambda m: m.pop("device"), "its 'device' is None, not a dict"),
               "files": (lambda m: m.update(files=["model.onnx"]), "its 'files' is ['model.onnx'], not a dict"),
               "relabelled": (lambda m: m.update(backend="eager", requires=registry.get("eager").pinned()),
                              "the manifest's engine options are not eager's"),
               "relabelled-bare": (lambda m: (m.update(backend="eager", requires=registry.get("eager").pinned()),
                                              m["engine"].update(options={})), "eager's loader could not open it"),
               "relabelled-only": (lambda m: m.update(backend="eager"), "built with onnxruntime 1."),
               "specs": (lambda m: m["engine"].pop("input_specs"), "engine.input_specs does not describe every input")}
    for name, (edit, says) in crafted.items():
        eng = _copy(built / "onnxruntime-fp32", tmp_path / name)
        meta = json.loads((eng / MANIFEST).read_text())
        edit(meta)
        manifest.rewrite(eng, meta)
        for verb in ("load", "verify"):
            assert main([verb, str(eng)]) == 2, (name, verb)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and says in err, (name, verb, err)

    class Evil:
        def __reduce__(self) -> Any:
            return (print, ("code ran",))

    eng = _copy(built / "eager-fp32", tmp_path / "pickle")
    (eng / "reference.pt").write_bytes(pickle.dumps({"shapes": Evil()}))
    meta = json.loads((eng / MANIFEST).read_text())
    meta["files"]["reference.pt"] = manifest.sha256(eng / "reference.pt")
    manifest.rewrite(eng, meta)
    assert main(["verify", str(eng)]) == 2
    out = capsys.readouterr()
    assert "reference.pt is not a Kiln reference file (UnpicklingError" in out.err and "code ran" not in out.out


def test_an_engine_from_other_library_versions_is_refused(built: Path, tmp_path: Path) -> None:
    eng = _copy(built / "eager-fp32", tmp_path / "v")
    meta = json.loads((eng / MANIFEST).read_text())
    meta["requires"]["torch"] = "1.13"
    manifest.rewrite(eng, meta)  # resealed, as whoever rewrites a manifest on purpose can
    with pytest.raises(ArtifactError, match="built with torch 1.13; this machine has torch 2"):
        load(eng)
    meta["files"]["../../etc/passwd"] = "0" * 64
    manifest.rewrite(eng, meta)  # resealed, as whoever rewrites a manifest on purpose can
    with pytest.raises(ArtifactError, match="outside the engine"):
        load(eng)


def test_an_interrupted_build_leaves_nothing_a_load_accepts(built: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = built.parent
    before = (built / "onnxruntime-fp32" / MANIFEST).read_text()

    def killed(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt("build killed after the engine files were written")

    monkeypatch.setattr(store, "install", killed)
    with pytest.raises(KeyboardInterrupt):
        build("tiny-bert", "onnxruntime", root=root, cache_dir=cache_dir, options={"onnxruntime": {"fuse": False}}, **ROOT_ARGS)
    assert (built / "onnxruntime-fp32" / MANIFEST).read_text() == before  # the old engine is whole
    assert not list(built.glob(".staging-*"))  # the half-built one is gone
    check_artifact(built / "onnxruntime-fp32")


def test_load_in_a_fresh_process_without_the_models_code(built: Path) -> None:
    code = (
        "import sys, torch, pipeline\n"
        f"m = pipeline.load({str(built / 'onnxruntime-fp32')!r})\n"
        f"ref = torch.load({str(built / 'onnxruntime-fp32' / 'reference.pt')!r}, weights_only=True)['shapes']['1x16']\n"
        "out = m(ref['inputs'][0])['last_hidden_state']\n"
        "assert torch.allclose(out, ref['outputs'][0]['last_hidden_state'], atol=1e-4)\n"
        "assert 'transformers' not in sys.modules, 'loading needed the model code'\n"
        "print('ok', tuple(out.shape))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ok (1, 16, 32)" in res.stdout


def _models(repo: Path) -> list[str]:
    """What Triton sees in a repository: its subdirectories (install's lock files are files)."""
    return sorted(p.name for p in repo.iterdir() if p.is_dir())


def _parsed(path: Path) -> Any:
    """A written config.pbtxt parsed as Triton parses it: into its ModelConfig protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_triton_repository(built: Path, tmp_path: Path) -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    model_dir = export_triton(built / "onnxruntime-fp32", tmp_path / "repo", name="minibert")
    assert (model_dir / "1" / "model.onnx").is_file() and (model_dir / "1" / "model.onnx.data").is_file()
    cfg = _parsed(model_dir / "config.pbtxt")
    assert cfg.name == "minibert" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert {i.name: list(i.dims) for i in cfg.input} == {"input_ids": [-1], "attention_mask": [-1]}
    assert [(o.name, list(o.dims), o.data_type) for o in cfg.output] == [("last_hidden_state", [-1, 32], pb.TYPE_FP32)]
    assert cfg.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 1)]  # built on the CPU
    with pytest.raises(InputError, match="no Triton backend"):
        export_triton(built / "eager-fp32", tmp_path / "repo")
    from pipeline.triton import sanitize

    assert sanitize("café-bert") == "cafe-bert" and sanitize("../x") == "x"  # one directory, ASCII
    assert sanitize("模型") != sanitize("模型二") and sanitize("模型").startswith("model-")  # nothing left: never one name for all
    assert _models(tmp_path / "repo") == ["minibert"]  # no staging left behind


class _FakeTriton:
    """The few names of Triton's triton_python_backend_utils the tokenizer model uses, to run it here."""

    class Tensor:
        def __init__(self, name: str, array: Any) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> Any:
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors: list[Any]) -> None:
            self.outputs = {t.name: t.array for t in output_tensors}

    @staticmethod
    def get_input_tensor_by_name(request: dict[str, Any], name: str) -> Any:
        return _FakeTriton.Tensor(name, request[name])


def test_triton_repository_that_takes_text(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import sys
    import types

    import numpy as np
    from google.protobuf import json_format
    from transformers import AutoTokenizer

    repo = tmp_path / "repo"
    assert main(["triton", str(built / "onnxruntime-fp32"), "--repo", str(repo), "--name", "mini bert/v1", "--text"]) == 0
    assert _models(repo) == ["mini_bert_v1", "mini_bert_v1-text", "mini_bert_v1-tokenizer"]
    engine, tok, ens = (_parsed(repo / n / "config.pbtxt") for n in ("mini_bert_v1", "mini_bert_v1-tokenizer", "mini_bert_v1-text"))
    assert tok.backend == "python" and ens.platform == "ensemble" and (repo / "mini_bert_v1-text" / "1").is_dir()
    assert tok.max_batch_size == ens.max_batch_size == engine.max_batch_size
    # the ensemble is wired: every step reads the ensemble's inputs or an earlier step's outputs,
    # feeds each model exactly the inputs its config declares, and ends in the engine's outputs
    configs = {c.name: c for c in (engine, tok)}
    have = {i.name for i in ens.input}
    for step in ens.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert set(step.input_map) == {i.name for i in model.input} and set(step.input_map.values()) <= have
        assert set(step.output_map) <= {o.name for o in model.output}
        have |= set(step.output_map.values())
    assert [o.name for o in ens.output] == [o.name for o in engine.output] and {o.name for o in ens.output} <= have

    # the tokenizer model, run as Triton's Python backend would, gives what the artifact's tokenizer gives
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.SimpleNamespace(**{
        k: getattr(_FakeTriton, k) for k in ("Tensor", "InferenceResponse", "get_input_tensor_by_name")}))
    source = (repo / "mini_bert_v1-tokenizer" / "1" / "model.py").read_text()
    ns: dict[str, Any] = {}
    exec(compile(source, "model.py", "exec"), ns)
    model = ns["TritonPythonModel"]()
    model.initialize({"model_repository": str(repo / "mini_bert_v1-tokenizer"), "model_version": "1",
                      "model_config": json.dumps(json_format.MessageToDict(tok, preserving_proto_field_name=True))})
    texts = ["A short one.", "A somewhat longer sentence, to be padded against."]
    (resp,) = model.execute([{"TEXT": np.array([[t.encode()] for t in texts], dtype=object)}])
    want = AutoTokenizer.from_pretrained(built / "onnxruntime-fp32")(texts, padding="longest", return_tensors="np")
    assert np.array_equal(resp.outputs["input_ids"], want["input_ids"]) and resp.outputs["input_ids"].dtype == np.int64
    assert np.array_equal(resp.outputs["attention_mask"], want["attention_mask"])


def test_triton_export_keeps_other_versions_and_writes_nothing_when_it_fails(built: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    export_triton(built / "onnxruntime-fp32", repo, name="m", version=2)
    export_triton(built / "onnxruntime-fp32", repo, name="m", version=1)
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2", "config.pbtxt"]
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))

    def broken(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.triton.shutil.copy2", broken)
    with pytest.raises(OSError, match="disk full"):
        export_triton(built / "onnxruntime-fp32", repo, name="m", version=3, text=True)
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before  # as it was, no staging left
    with pytest.raises(InputError, match="carries no tokenizer"):
        export_triton(_without_tokenizer(built, tmp_path), repo, name="x", text=True)
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before


def _without_tokenizer(built: Path, tmp_path: Path) -> Path:
    """The onnxruntime engine as `kiln run --save-engines` leaves it: no tokenizer in its manifest."""
    art = tmp_path / "plain"
    shutil.copytree(built / "onnxruntime-fp32", art)
    meta = json.loads((art / MANIFEST).read_text())
    for f in meta.pop("tokenizer"):
        (art / f).unlink()
    manifest.rewrite(art, {**meta, "files": manifest.hashes(art)})
    return art


def test_triton_config_for_a_tensorrt_plan_uses_the_profiles_batch_and_the_gpu() -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    meta = Manifest("tensorrt", Precision.FP16, {"type": "cuda", "arch": "sm_90"}, {},
                    inputs={"input_ids": {"dtype": "int64", "dims": ["batch", "seq"]}},
                    outputs={"logits": {"dtype": "float16", "dims": ["batch", "seq", 1000]}}, axis_ranges={"batch": (1, 64)},
                    engine={"profile": {"input_ids": [[1, 16], [8, 128], [8, 128]]}})
    from google.protobuf import text_format

    cfg = text_format.Parse(config_pbtxt("gpt", meta), pb.ModelConfig())
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
    assert [(o.data_type, list(o.dims)) for o in cfg.output] == [(pb.TYPE_FP16, [-1, 1000])]
    assert [(g.kind, list(g.gpus)) for g in cfg.instance_group] == [(pb.ModelInstanceGroup.KIND_GPU, [0])]


@dataclass(frozen=True)
class DriftOptions(BackendOptions):
    offset: float = 0.0  # added to every output at seq > 16: exact at the small shape, off at the large one
    perturb_save: bool = False  # the saved files compute something else than the engine that ran


class DriftModel(EagerModel):
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().run(inputs)
        extra = self.options.offset if inputs["input_ids"].shape[1] > 16 else 0.0
        if self.loaded_from is not None and (self.loaded_from / "perturbed").is_file():
            extra += 1e-2
        return {k: v + extra for k, v in out.items()}

    def _save_files(self, directory: Path) -> list[Path]:
        files = super()._save_files(directory)
        if self.options.perturb_save:
            (directory / "perturbed").write_text("the saved engine is not the one that ran")
            files.append(directory / "perturbed")
        return files


class DriftBackend(EagerBackend):
    name = "drifts-for-test"
    options_type = DriftOptions

    def _compile(self, captured: Any, spec: Any, shapes: Any) -> Any:
        m = super()._compile(captured, spec, shapes)
        return DriftModel(spec, m.module, m.program)  # type: ignore[attr-defined]

    def _load(self, directory: Path, spec: Any, manifest: Any) -> Any:
        m = super()._load(directory, spec, manifest)
        return DriftModel(spec, m.module, m.program)  # type: ignore[attr-defined]


@pytest.fixture
def drift() -> Any:
    registry.register(DriftBackend())
    yield
    registry.unregister("drifts-for-test")


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.slow
def test_an_engine_off_at_one_shape_is_never_installed_nor_reused(drift: Any, tmp_path: Path, cache_dir: Path) -> None:
    good = build("tiny-bert", "drifts-for-test", root=tmp_path, cache_dir=cache_dir, **ROOT_ARGS)
    assert [o.status for o in good] == ["built"]
    target = tmp_path / "tiny-bert" / "drifts-for-test-fp32"
    before = _files(target)
    for _ in range(2):  # the second time it is built again, never `reused`
        out = build("tiny-bert", "drifts-for-test", root=tmp_path, cache_dir=cache_dir,
                    options={"drifts-for-test": {"offset": 1e-2}}, **ROOT_ARGS)
        assert [o.status for o in out] == ["mismatch"] and "at 2x24" in out[0].reason and "at 1x16" not in out[0].reason
        assert _files(target) == before  # the previous engine, byte for byte
    argv = ["build", "--model", "tiny-bert", "--backends", "drifts-for-test", "--option", "drifts-for-test.offset=0.01",
            "--shapes", "1x16,2x24", "--root", str(tmp_path), "--cache-dir", str(cache_dir), "--rounds", "2", "--warmup", "1",
            "--device", "cpu", "--quiet"]
    assert main(argv) == 1


def test_saved_files_that_differ_from_what_ran_are_a_mismatch(drift: Any, tmp_path: Path, cache_dir: Path) -> None:
    out = build("tiny-bert", "drifts-for-test", root=tmp_path, cache_dir=cache_dir,
                options={"drifts-for-test": {"perturb_save": True}}, **ROOT_ARGS)
    assert [o.status for o in out] == ["mismatch"] and "the saved engine, loaded back" in out[0].reason
    assert f"built with the cache at {cache_dir}" in out[0].reason and "--no-cache" in out[0].reason  # which cache, and the way out
    assert not (tmp_path / "tiny-bert" / "drifts-for-test-fp32").exists()


def test_load_refuses_an_engine_whose_verdict_is_not_a_pass(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eng = _copy(built / "onnxruntime-fp32", tmp_path)
    meta = json.loads((eng / MANIFEST).read_text())
    meta["verdict"]["status"] = "mismatch"
    manifest.rewrite(eng, meta)  # resealed, as whoever rewrites a manifest on purpose can
    with pytest.raises(ArtifactError, match="build verdict is 'mismatch'.*allow_failed=True"):
        load(eng)
    assert load(eng, allow_failed=True).backend == "onnxruntime"
    assert main(["load", str(eng)]) == 2 and main(["load", str(eng), "--allow-failed"]) == 0
    capsys.readouterr()
    repo = tmp_path / "repo"  # a server would answer with it: Triton refuses it too, unless told
    assert main(["triton", str(eng), "--repo", str(repo)]) == 2
    assert "export it anyway with --allow-failed" in capsys.readouterr().err and not list(repo.glob("*/config.pbtxt"))
    assert main(["triton", str(eng), "--repo", str(repo), "--allow-failed"]) == 0 and list(repo.glob("*/config.pbtxt"))


def test_an_engine_kiln_run_saved_is_refused_where_an_artifact_is_needed(tmp_path: Path, cache_dir: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny-bert", "--backends", "onnxruntime", "--shapes", "1x8", "--rounds", "1", "--warmup", "0",
                 "--isolation", "none", "--save-engines", "--out", str(out), "--cache-dir", str(cache_dir), "--quiet"]) == 0
    capsys.readouterr()
    eng = out / "engines" / "onnxruntime-fp32"
    assert load(eng).backend == "onnxruntime"  # the API loads the engine itself
    for argv in (["load", str(eng)], ["verify", str(eng)], ["triton", str(eng), "--repo", str(tmp_path / "repo")],
                 ["predict", str(eng), "a sentence"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "kiln build" in err, (argv, err)


def _kiln(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_concurrent_builds_on_one_root_and_cache_both_succeed(tmp_path: Path) -> None:
    args = ["build", "--model", "tiny-bert", "--backends", "onnxruntime", "--shapes", "1x16,2x24", "--root", str(tmp_path / "root"),
            "--cache-dir", str(tmp_path / "cache"), "--rounds", "2", "--warmup", "1", "--device", "cpu", "--quiet"]
    procs = [_kiln(*args), _kiln(*args)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(" built " in o or " reused " in o for o in outs), outs
    assert verify(tmp_path / "root" / "tiny-bert" / "onnxruntime-fp32").passed
    assert not list((tmp_path / "root" / "tiny-bert").glob(".staging-*"))


@pytest.mark.slow
def test_a_build_killed_at_any_moment_leaves_nothing_that_stops_the_next(tmp_path: Path) -> None:
    import signal
    import time

    root, cache = tmp_path / "root", tmp_path / "cache"
    args = ["build", "--model", "tiny-bert", "--backends", "onnxruntime", "--shapes", "1x16", "--root", str(root),
            "--cache-dir", str(cache), "--rounds", "2", "--warmup", "1", "--device", "cpu", "--quiet"]
    victim = _kiln(*args)
    deadline = time.monotonic() + 120
    while not list((root / "tiny-bert").glob(".staging-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert list((root / "tiny-bert").glob(".staging-*"))  # killed mid-build: its staging is left behind ...
    again = _kiln(*args)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out
    assert not list((root / "tiny-bert").glob(".staging-*"))  # ... and cleaned by the next build
    assert verify(root / "tiny-bert" / "onnxruntime-fp32").passed


def test_a_reader_never_finds_the_engine_missing_during_installs(tmp_path: Path) -> None:
    """Installs swap the new directory with the old in one step: a reader polling the manifest
    during 100 installs reads the old engine or the new one, every time."""
    import threading

    target = tmp_path / "tiny-bert" / "eager-fp32"
    target.mkdir(parents=True)
    (target / MANIFEST).write_text('{"n": -1}')
    misses, reads, done = [], [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                json.loads((target / MANIFEST).read_text())
                reads[0] += 1
            except (FileNotFoundError, ValueError) as e:
                misses.append(repr(e))

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for i in range(100):
            staged = tmp_path / "tiny-bert" / f".staging-{i}"
            staged.mkdir()
            (staged / MANIFEST).write_text(json.dumps({"n": i}))
            store.install(staged, target)
    finally:
        done.set()
        reader.join()
    assert not misses and reads[0] > 100, (misses[:3], reads)
    assert json.loads((target / MANIFEST).read_text()) == {"n": 99}
    assert sorted(p.name for p in target.parent.iterdir()) == [".eager-fp32.lock", "eager-fp32"]  # no old copy left


def test_a_kill_between_the_two_renames_of_an_install_is_undone(built: Path, cache_dir: Path) -> None:
    target = built / "eager-fp32"
    before = _files(target)
    target.rename(built / ".old-999999999-eager-fp32")  # moved aside by a process that died before renaming the new one in
    out = build("tiny-bert", "eager", root=built.parent, cache_dir=cache_dir, **ROOT_ARGS)
    assert [o.status for o in out] == ["reused"] and _files(target) == before


def test_a_cache_entry_that_was_altered_is_made_again(tiny_captured: Any) -> None:
    onnx = tiny_captured.onnx_path()
    first = onnx.read_bytes()
    onnx.write_bytes(first[: len(first) // 2])  # truncated after it was made
    again = tiny_captured.onnx_path()
    assert again == onnx and again.read_bytes() == first


def test_signing_works_with_relative_paths_encrypted_keys_and_refuses_rsa_in_one_line(built: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    private, public = keys(tmp_path, "ours")
    eng = _copy(built / "eager-fp32", tmp_path / "work")
    (tmp_path / "elsewhere").mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}  # this checkout, from any directory

    def kiln(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=cwd, capture_output=True, text=True, timeout=300,
                              env=env)

    assert kiln("sign", "eager-fp32", "--key", str(private), cwd=eng.parent).returncode == 0  # a relative path
    ok = kiln("verify", "../work/eager-fp32", "--require-signature", "--key", str(public), cwd=tmp_path / "elsewhere")
    assert ok.returncode == 0 and ok.stdout.startswith("PASS"), ok.stderr
    assert verify(eng, public_key=public).passed  # and by its absolute path, after signing by a relative one
    locked = ec.generate_private_key(ec.SECP256R1())
    enc = tmp_path / "enc.pem"
    enc.write_bytes(locked.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"s3cret")))
    (tmp_path / "enc.pub").write_bytes(locked.public_key().public_bytes(serialization.Encoding.PEM,
                                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    assert main(["sign", str(eng), "--key", str(enc), "--password", "s3cret"]) == 0
    assert verify(eng, public_key=tmp_path / "enc.pub").passed
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for argv, says in ((["--key", str(rsa_key)], "is an RSA key; Kiln signs with model-signing's elliptic-curve key signer"),
                       (["--key", str(enc), "--password", "wrong"], "a wrong --password"),
                       (["--key", str(enc)], "Password was not given but private key is encrypted")):
        p = kiln("sign", str(eng), *argv, cwd=tmp_path)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and says in p.stderr, p.stderr
    assert verify(eng, public_key=tmp_path / "enc.pub").passed  # a refused signing left the signature as it was


def test_a_signed_engine_rewritten_with_its_manifest_is_refused(built: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    private, public = keys(tmp_path, "ours")
    eng = _copy(built / "eager-fp32", tmp_path / "signed")
    assert main(["sign", str(eng), "--key", str(private)]) == 0 and (eng / "model.sig").is_file()
    assert load(eng, public_key=public).backend == "eager" and verify(eng, public_key=public).passed
    # an attacker swaps the engine and rewrites the manifest's hash to match: the hashes alone accept it ...
    other = _copy(built / "onnxruntime-fp32", tmp_path / "other")
    (eng / "program.pt2").write_bytes((other / "model.onnx").read_bytes())
    meta = json.loads((eng / MANIFEST).read_text())
    meta["files"]["program.pt2"] = manifest.sha256(eng / "program.pt2")
    manifest.rewrite(eng, meta)  # resealed, as whoever rewrites a manifest on purpose can
    check_artifact(eng)
    # ... the signature does not, before any of the engine's code is opened
    with pytest.raises(ArtifactError, match="signature does not verify"):
        load(eng, public_key=public)
    assert main(["load", str(eng), "--require-signature", "--key", str(public)]) == 2
    assert "signature does not verify" in capsys.readouterr().err
    _, theirs = keys(tmp_path, "theirs")
    good = _copy(built / "eager-fp32", tmp_path / "good")
    main(["sign", str(good), "--key", str(private)])
    with pytest.raises(ArtifactError, match="signature does not verify"):
        load(good, public_key=theirs)  # signed, but not by the key we trust
    with pytest.raises(ArtifactError, match="is not signed"):
        load(built / "onnxruntime-fp32", public_key=public)
    assert load(built / "onnxruntime-fp32").backend == "onnxruntime"  # unsigned engines load without the requirement


def test_links_in_an_engine_are_refused(built: Path, tmp_path: Path) -> None:
    eng = _copy(built / "eager-fp32", tmp_path / "linked")
    outside = tmp_path / "outside.pt2"
    (eng / "program.pt2").rename(outside)
    (eng / "program.pt2").symlink_to(outside)  # same bytes, same hash, but not in the engine
    with pytest.raises(ArtifactError, match="program.pt2 is a symbolic link"):
        load(eng)


@pytest.mark.slow
def test_an_int8_engine_builds_carries_its_calibration_and_verifies(tmp_path: Path, cache_dir: Path) -> None:
    quant = {"method": "minmax", "samples": 16}
    out = build("tiny-bert", "onnxruntime", root=tmp_path, cache_dir=cache_dir, quant=quant,
                **{**ROOT_ARGS, "precisions": "int8,int8-dynamic"})
    assert [(o.precision, o.status) for o in out] == [("int8", "built"), ("int8-dynamic", "built")]
    assert all(o.size_mb and o.size_mb > 0 for o in out)
    static = tmp_path / "tiny-bert" / "onnxruntime-int8"
    meta = check_artifact(static)
    q = meta.engine["quantization"]
    assert q["method"] == "minmax" and q["samples"] == 16 and q["layers"] == 12 and "calibration.json" in meta.files
    assert meta.artifact_mb and meta.artifact_mb > 0
    for o in out:
        assert verify(o.path).passed  # the task verdict again, from the stored sentences, in this process
    again = build("tiny-bert", "onnxruntime", root=tmp_path, cache_dir=cache_dir, quant=quant,
                  **{**ROOT_ARGS, "precisions": "int8"})
    assert [o.status for o in again] == ["reused"]
    other = build("tiny-bert", "onnxruntime", root=tmp_path, cache_dir=cache_dir, quant={**quant, "method": "percentile"},
                  **{**ROOT_ARGS, "precisions": "int8"})
    assert [o.status for o in other] == ["built"]  # another calibration: another engine
    assert check_artifact(static).engine["quantization"]["method"] == "percentile"


def test_an_artifact_answers_text(built: Path, tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.predict import Predictor

    meta = check_artifact(built / "onnxruntime-fp32")
    assert "tokenizer.json" in meta.tokenizer and set(meta.tokenizer) <= set(meta.files)  # hashed like the rest
    texts = ["A man is playing a guitar.", "Someone strums a guitar outside.", "The stock market fell."]
    answers = Predictor.load(built / "onnxruntime-fp32").predict(texts)
    eager = Predictor.load(built / "eager-fp32").predict(texts)
    for a, e in zip(answers, eager):
        emb = torch.tensor(a["embedding"])
        assert a["text"] == e["text"] and emb.norm() == pytest.approx(1.0, abs=1e-4)
        assert torch.allclose(emb, torch.tensor(e["embedding"]), atol=1e-4)  # the engine, not a copy of eager
    assert main(["predict", str(built / "onnxruntime-fp32"), "one sentence", "and another"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["text"] for x in lines] == ["one sentence", "and another"]
    # a classifier answers with its labels
    out = build("tiny-distilbert-sst2", "onnxruntime", root=tmp_path, cache_dir=cache_dir, **ROOT_ARGS)
    assert [o.status for o in out] == ["built"]
    labels = Predictor.load(out[0].path).predict(texts)
    assert all(x["label"] in ("LABEL_0", "LABEL_1") and 0.5 <= x["score"] <= 1.0 for x in labels)
    fresh = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(out[0].path), *texts], capture_output=True,
                           text=True, timeout=300)  # a fresh process: nothing of the model but the artifact
    assert fresh.returncode == 0, fresh.stderr
    assert [json.loads(x) for x in fresh.stdout.splitlines()] == labels
    # a changed tokenizer file is refused like any other file of the engine
    bad = _copy(built / "eager-fp32", tmp_path)
    (bad / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="tokenizer_config.json"):
        Predictor.load(bad)
    with pytest.raises(InputError, match="list of one or more strings"):
        Predictor.load(built / "eager-fp32").predict("not a list")
    # text over the built sequence range is answered from its first tokens, and says so
    long = " ".join(["guitar"] * 300)
    (cut,) = Predictor.load(built / "onnxruntime-fp32").predict([long])
    assert cut["truncated"] == {"tokens": 302, "kept": 256} and "truncated" not in answers[0]
    assert main(["predict", str(built / "onnxruntime-fp32"), long]) == 0
    assert "text 1 is 302 tokens and the engine takes at most 256: answered from its first 256" in capsys.readouterr().err


def test_an_artifact_without_a_tokenizer_says_so(tmp_path: Path, cache_dir: Path) -> None:
    from pipeline.predict import Predictor

    out = build("tiny-gpt2", "eager", root=tmp_path, cache_dir=cache_dir, **ROOT_ARGS)
    assert [o.status for o in out] == ["built"]
    with pytest.raises(ArtifactError, match="carries no tokenizer"):
        Predictor.load(out[0].path)


class _ScriptEager(EagerBackend):
    """A backend as a user's script would define one: its class lives in __main__, which no worker can import."""

    name = "script-eager-for-test"


_ScriptEager.__module__ = "__main__"


def test_a_backend_defined_in_a_script_is_built_and_accepted_in_this_process(tmp_path: Path, cache_dir: Path) -> None:
    """One rule decides where a build accepts its saved files, for forward and generation alike: in
    a fresh worker, except for a backend class a worker cannot import."""
    from pipeline.worker import loads_in_worker

    registry.register(_ScriptEager())
    try:
        assert not loads_in_worker("process", _ScriptEager.name) and loads_in_worker("process", "eager")
        assert not loads_in_worker("none", "eager")
        [outcome] = build("tiny-bert", _ScriptEager.name, shapes="1x8", root=tmp_path, cache_dir=cache_dir, warmup=1, rounds=2)
        assert outcome.status == "built", outcome.reason
        assert manifest.read(outcome.path).verdict.status == "pass"
    finally:
        registry.unregister(_ScriptEager.name)
