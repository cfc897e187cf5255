"""Deployable engines: build, reuse, refuse tampered/truncated/foreign ones, atomic writes, load in a fresh process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import store
from pipeline.build import build
from pipeline.store import MANIFEST, check_artifact, load, verify
from pipeline.cli import main
from pipeline.errors import ArtifactError, InputError
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
    meta = check_artifact(built / "onnxruntime-fp32")
    assert meta["model"]["name"] == "tiny-bert" and len(meta["model"]["graph_hash"]) == 16
    assert meta["inputs"]["input_ids"] == {"dtype": "int64", "dims": ["batch", "seq"], "high": 30522}
    assert meta["outputs"]["last_hidden_state"] == {"dims": ["batch", "seq", 32], "dtype": "float32"}
    assert meta["axis_ranges"] == {"batch": [1, 64], "seq": [1, 256]}
    assert set(meta["files"]) == {"model.onnx", "model.onnx.data", "reference.pt"}  # one manifest, no other metadata file
    assert meta["requires"]["onnxruntime"] and meta["device"]["type"] == "cpu"
    assert meta["verdict"]["verdict"] == "pass" and meta["benchmark"]["2x24"]["speedup"] > 0
    assert meta["build_options"] == {"fuse": True, "graph_optimization": "all"}


def test_second_build_reuses(built: Path, cache_dir: Path) -> None:
    out = build("tiny-bert", "onnxruntime", root=built.parent, cache_dir=cache_dir, **ROOT_ARGS)
    assert [o.status for o in out] == ["reused"]
    changed = build("tiny-bert", "onnxruntime", root=built.parent, cache_dir=cache_dir,
                    options={"onnxruntime": {"graph_optimization": "basic"}}, **ROOT_ARGS)
    assert [o.status for o in changed] == ["built"]  # a build option changed: a new engine
    assert check_artifact(built / "onnxruntime-fp32")["build_options"]["graph_optimization"] == "basic"


def test_verify_passes_on_a_good_engine(built: Path) -> None:
    c = verify(built / "eager-fp32")
    assert c.passed and c.batches == 2
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


def test_an_engine_from_other_library_versions_is_refused(built: Path, tmp_path: Path) -> None:
    eng = _copy(built / "eager-fp32", tmp_path / "v")
    meta = json.loads((eng / MANIFEST).read_text())
    meta["requires"]["torch"] = "1.13"
    (eng / MANIFEST).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="built with torch 1.13; this machine has torch 2"):
        load(eng)
    meta["files"]["../../etc/passwd"] = "0" * 64
    (eng / MANIFEST).write_text(json.dumps(meta))
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
        f"ref = torch.load({str(built / 'onnxruntime-fp32' / 'reference.pt')!r}, weights_only=True)\n"
        "out = m(ref['inputs'][0])['last_hidden_state']\n"
        "assert torch.allclose(out, ref['outputs'][0]['last_hidden_state'], atol=1e-4)\n"
        "assert 'transformers' not in sys.modules, 'loading needed the model code'\n"
        "print('ok', tuple(out.shape))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ok (1, 16, 32)" in res.stdout


def test_triton_repository(built: Path, tmp_path: Path) -> None:
    model_dir = export_triton(built / "onnxruntime-fp32", tmp_path / "repo", name="minibert")
    assert (model_dir / "1" / "model.onnx").is_file() and (model_dir / "1" / "model.onnx.data").is_file()
    cfg = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in cfg and "max_batch_size: 64" in cfg
    assert "dims: [ -1 ]" in cfg and "dims: [ -1, 32 ]" in cfg and "dynamic_batching" in cfg
    with pytest.raises(InputError, match="no Triton backend"):
        export_triton(built / "eager-fp32", tmp_path / "repo")


def test_triton_config_for_a_tensorrt_plan_uses_the_profiles_batch() -> None:
    meta = {"backend": "tensorrt", "inputs": {"input_ids": {"dtype": "int64", "dims": ["batch", "seq"]}},
            "outputs": {"logits": {"dtype": "float16", "dims": ["batch", "seq", 1000]}}, "axis_ranges": {"batch": [1, 64]},
            "engine": {"profile": {"input_ids": [[1, 16], [8, 128], [8, 128]]}}}
    cfg = config_pbtxt("gpt", meta)
    assert 'platform: "tensorrt_plan"' in cfg and "max_batch_size: 8" in cfg and "TYPE_FP16" in cfg and "dims: [ -1, 1000 ]" in cfg
