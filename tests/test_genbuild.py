"""`kiln build --mode generate`: both steps shipped, loaded back and checked before install;
`kiln predict` generates the text transformers generates, in a fresh process; reuse, tampering
and bad input."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import backends as registry
from helpers import keys, word_tokenizer
from plugin_backend import ExportedProgramBackend
from pipeline import manifest, store
from pipeline.cli import main
from pipeline.errors import ArtifactError, InputError
from pipeline.build import build
from pipeline.store import load_generation, verify_generation

BACKENDS = ("eager", "inductor", "onnxruntime", "tvm", "openvino")
build_generation = functools.partial(build, mode="generate")  # kiln build --mode generate, through the API
PROMPT = "the model reads the sentence and"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 saved with save_pretrained, with a real (word-level) tokenizer beside it."""
    path = tmp_path_factory.mktemp("genbuild") / "tiny-gpt2-text"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=1000, n_positions=128, bos_token_id=2,
                                     eos_token_id=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    word_tokenizer(path, "left")
    return path


class _DriftingDecode(ExportedProgramBackend):
    """Saves both steps as they ran, but its loader's decode step answers another token: what a
    build would ship if only the in-memory engine were checked."""

    name = "drifting-decode-for-test"

    def _load(self, directory: Path, spec: Any, manifest: Any) -> Any:
        model = super()._load(directory, spec, manifest)
        if directory.name == "decode":
            run = model.run
            model.run = lambda inputs: {**(out := run(inputs)), "logits": out["logits"].roll(1, dims=-1)}  # type: ignore[method-assign]
        return model


@pytest.fixture(scope="module")
def built(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, list[Any]]:
    pytest.importorskip("tvm")
    root = tmp_path_factory.mktemp("gen-artifacts")
    registry.register(_DriftingDecode())  # one build's steps and references serve it too (test below)
    try:
        outcomes = build_generation(str(gpt2_dir), ",".join([*BACKENDS, _DriftingDecode.name]), shapes="1x8,2x8", root=root,
                                    new_tokens=6, rounds=1, options={"tvm": {"trials_per_task": 0}}, cache_dir=cache_dir)
    finally:
        registry.unregister(_DriftingDecode.name)
    return root / "tiny-gpt2-text", outcomes


@pytest.mark.slow
def test_a_generation_build_ships_both_steps_checked_and_timed(built: tuple[Path, list[Any]]) -> None:
    home, outcomes = built
    outcomes = [o for o in outcomes if o.backend in BACKENDS]
    assert [(o.backend, o.status) for o in outcomes] == [(b, "built") for b in BACKENDS], [o.reason for o in outcomes]
    for o in outcomes:
        assert o.path == home / f"{o.backend}-fp32-generate"
        meta = manifest.read(o.path).to_dict()
        assert meta["mode"] == "generate" and meta["generation"]["cache"]["max_len"] == 14  # 8 + 6
        files = meta["files"]
        assert {"prefill/manifest.json", "decode/manifest.json", "reference.pt", "tokenizer.json"} <= set(files)
        assert set(meta["tokenizer"]) <= set(files)
        for kind in ("prefill", "decode"):  # each step is an engine directory of its own
            step = manifest.read(o.path / kind).to_dict()
            assert step["backend"] == o.backend and step["engine"]["inputs"][:2] == ["input_ids", "start"]
        assert step["engine"]["input_specs"]["input_ids"]["dims"] == ["batch", 1]  # decode: one token
        verdict = meta["verdict"]
        assert "fresh worker process" in verdict["engine"]  # what was checked and timed: the files, loaded back
        assert verdict["status"] == "pass"
        for shape in ("1x8", "2x8"):
            v = verdict["shapes"][shape]
            assert v["agreement"] == 1.0 and v["first_divergence"] is None and v["max_logits_error"] < 1e-4
            assert v["decode_tokens_per_s"] > 0 and v["decode_speedup"] > 0 and v["eager_fp32_decode_tokens_per_s"] > 0
    tvm = manifest.read(home / "tvm-fp32-generate").to_dict()
    assert any("untuned" in n for n in tvm["notes"])


@pytest.mark.slow
def test_predict_generates_what_transformers_generates_in_a_fresh_process(built: tuple[Path, list[Any]], gpt2_dir: Path) -> None:
    home, _ = built
    tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    want_ids = want[0, ids.shape[1]:].tolist()
    if 2 in want_ids:  # the answer stops at the end-of-text token
        want_ids = want_ids[:want_ids.index(2)]
    for backend in ("inductor", "onnxruntime", "tvm"):
        done = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(home / f"{backend}-fp32-generate"), PROMPT,
                               "--new-tokens", "5"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        assert answer["text"] == PROMPT and answer["token_ids"] == want_ids, backend
        assert answer["generated"] == tok.decode(want_ids)


@pytest.mark.slow
def test_kiln_load_and_verify_generate_the_builds_tokens_again(built: tuple[Path, list[Any]], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = built
    art = home / "onnxruntime-fp32-generate"
    assert main(["verify", str(art)]) == 0
    out = capsys.readouterr().out
    assert "PASS: at 1x8: 100% of 6 tokens as eager fp32's; at 2x8: 100% of 12 tokens" in out
    assert main(["load", str(art)]) == 0 and "loaded onnxruntime fp32 generation artifact" in capsys.readouterr().out
    with pytest.raises(ArtifactError, match="load it with pipeline.load_generation"):
        store.load(art)  # a forward loader never takes it for an engine
    assert main(["triton", str(art), "--repo", str(tmp_path / "repo")]) == 2
    assert "is a generation artifact" in capsys.readouterr().err and not (tmp_path / "repo").exists()


@pytest.mark.slow
def test_a_signed_generation_artifact_loads_only_with_the_key_it_was_signed_for(built: tuple[Path, list[Any]],
                                                                                 tmp_path: Path) -> None:
    pytest.importorskip("model_signing")
    home, _ = built
    art = tmp_path / "signed"
    shutil.copytree(home / "onnxruntime-fp32-generate", art)
    private, public = keys(tmp_path, "ours")
    assert main(["sign", str(art), "--key", str(private)]) == 0
    assert load_generation(art, public_key=public).generate(torch.tensor([[5, 6, 7]]), 2).tokens.shape == (1, 2)
    _, theirs = keys(tmp_path, "theirs")
    with pytest.raises(ArtifactError, match="signature does not verify"):
        load_generation(art, public_key=theirs)


@pytest.mark.slow
def test_reuse_tampering_and_a_prompt_over_the_cache(built: tuple[Path, list[Any]], gpt2_dir: Path, cache_dir: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = built
    again = build_generation(str(gpt2_dir), "eager", shapes="1x8,2x8", root=home.parent, new_tokens=6, rounds=1,
                             cache_dir=cache_dir)
    assert [o.status for o in again] == ["reused"]
    art = load_generation(home / "eager-fp32-generate")
    long = " ".join(["the"] * 20)  # 20 tokens; the cache of 14 leaves room for 10 beside 4 new ones
    answer = art.generate_text([long], new_tokens=4)[0]
    assert answer["truncated"] == {"tokens": 20, "kept": 10} and len(answer["token_ids"]) <= 4
    with pytest.raises(InputError, match="generate 1 to 13"):
        art.generate_text(["the"], new_tokens=14)
    # a manifest resealed to point a step outside the artifact: refused before any step is opened
    import json
    import shutil

    from pipeline import store

    outside = tmp_path / "outside" / "eager-fp32-generate"
    shutil.copytree(home / "eager-fp32-generate", outside)
    meta = json.loads((outside / "manifest.json").read_text())
    meta["generation"]["steps"]["prefill"] = "../../OTHER/prefill"
    manifest.rewrite(outside, meta)
    with pytest.raises(ArtifactError, match="prefill step '../../OTHER/prefill' is not a directory inside the artifact"):
        load_generation(outside)
    assert main(["verify", str(outside)]) == 2 and "not a directory inside the artifact" in capsys.readouterr().err
    # one byte of the decode step changed: refused before the backend opens it, and nothing else changes
    victim = home / "eager-fp32-generate"
    data = victim / "decode" / "program.pt2"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="decode/program.pt2 does not match its sha256"):
        load_generation(victim)
    assert main(["predict", str(victim), "the"]) == 2
    assert "does not match its sha256" in capsys.readouterr().err
    with pytest.raises(ArtifactError):
        verify_generation(victim)


def test_generation_build_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], cache_dir: Path) -> None:
    root = tmp_path / "root"
    with pytest.raises(InputError, match="needs a causal LM; tiny-bert is encoder"):
        build_generation("tiny-bert", "eager", shapes="1x8", root=root, new_tokens=4)
    with pytest.raises(InputError, match="need 12 cache positions; --cache-len is 10"):
        build_generation("tiny-gpt2", "eager", shapes="1x8", root=root, new_tokens=4, cache_len=10)
    assert not root.exists()  # nothing written
    assert main(["build", "--model", "tiny-gpt2", "--backends", "eager", "--cache-len", "20", "--root", str(root)]) == 2
    assert "--cache-len is for --mode generate" in capsys.readouterr().err
    for mode in ("forward", "generate"):  # --rounds 0 is refused, not taken for the default
        assert main(["build", "--model", "tiny-gpt2", "--backends", "eager", "--mode", mode, "--rounds", "0",
                     "--root", str(root), "--quiet"]) == 2
        assert "--rounds 0" in capsys.readouterr().err


@pytest.mark.slow
def test_int8_dynamic_generation_ships_as_the_quantized_steps_captured(tmp_path: Path, cache_dir: Path) -> None:
    """The torchao-quantized steps, captured with torch.export like any step: an AOTInductor
    package per step (and the eager archive), loaded back and judged against eager int8's own agreement."""
    out = build_generation("tiny-gpt2", "eager,inductor", precisions="int8-dynamic", shapes="1x8", root=tmp_path, new_tokens=6,
                           rounds=1, cache_dir=cache_dir)
    assert [(o.backend, o.status) for o in out] == [("eager", "built"), ("inductor", "built")], [o.reason for o in out]
    meta = manifest.read(out[1].path).to_dict()
    v = meta["verdict"]["shapes"]["1x8"]
    assert meta["precision"] == "int8-dynamic" and "eager_agreement" in v and v["agreement"] >= v["eager_agreement"] - 0.05
    assert (out[1].path / "decode" / "model.pt2").is_file()
    done = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(out[1].path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "PASS" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_a_generation_build_checks_its_steps_loaded_back_in_a_fresh_worker(built: tuple[Path, list[Any]]) -> None:
    """The steps that ran are right; the files loaded back (in a worker process) are not: a
    mismatch naming the step where the tokens part, and nothing is installed."""
    home, outcomes = built
    (drift,) = [o for o in outcomes if o.backend == _DriftingDecode.name]
    assert drift.status == "mismatch" and "the saved engine, loaded back: at 1x8" in drift.reason, drift.reason
    assert "greedy tokens diverge from eager fp32 at step 1" in drift.reason and not drift.path.exists()
    assert not any(home.glob(".staging-*"))  # nothing staged left behind
