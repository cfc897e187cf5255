"""Generation with a static KV cache: the captured steps are the model's function, every backend
that takes them produces eager fp32's greedy tokens, a divergence names its step, bad input is
one line and exit 2."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import backends as registry
from backends.base import Backend, CompiledModel, ok
from backends.eager import EagerModel
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.decoding import Generation, agreement, greedy, module_step
from pipeline.generate import capture_generation
from pipeline.build import run
from pipeline.genrun import judge
from pipeline.inputs import Shape
from pipeline.models import load_model
from pipeline.precision import Precision
from pipeline.report import Report


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "tiny-llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2, intermediate_size=64, vocab_size=500,
                                                           max_position_embeddings=256)).save_pretrained(path)
    return path


@pytest.mark.parametrize("model", ["tiny-gpt2", "llama"])
def test_the_captured_steps_generate_what_transformers_generates(model: str, llama_dir: Path) -> None:
    bundle = load_model(str(llama_dir) if model == "llama" else model)
    programs = capture_generation(bundle, 32)
    prompt = torch.randint(0, bundle.inputs["input_ids"].high, (2, 10), generator=torch.Generator().manual_seed(3))
    hf = bundle.module.model  # type: ignore[union-attr]
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                           pad_token_id=0)[:, 10:]
        full = hf(input_ids=torch.cat([prompt, want], 1)).logits  # every step's logits, without a cache
    ref = module_step(programs.module, programs.output_names)
    for prefill, decode in ((ref, ref), (module_step(programs.prefill.module(), programs.output_names),
                                         module_step(programs.decode.module(), programs.output_names))):
        got = greedy(prefill, decode, programs.spec, prompt, 12)
        assert torch.equal(got.tokens, want)
        for i, logits in enumerate(got.step_logits):  # the cache holds what a full forward computes
            assert torch.allclose(logits, full[:, 9 + i], atol=1e-4)
    assert programs.spec.nbytes(2) == 2 * 2 * 2 * programs.spec.heads * 32 * programs.spec.head_dim * 4


def test_a_divergence_is_a_mismatch_naming_its_step() -> None:
    ref = Generation(torch.tensor([[5, 6, 7, 8]]), [torch.zeros(1, 10)] * 4, 1.0, [1.0] * 3)
    off = Generation(torch.tensor([[5, 6, 9, 8]]), [torch.zeros(1, 10)] * 4, 1.0, [1.0] * 3)
    a = agreement(ref, off)
    assert a.first_divergence == 2 and a.agreement == 0.75
    row = judge("x", Precision.FP32, Shape(1, 4), off, ref, {}, 4)
    assert row.status == "mismatch" and "diverge from eager fp32 at step 2" in row.reason
    assert judge("x", Precision.FP32, Shape(1, 4), ref, ref, {}, 4).status == "ok"
    nan = Generation(ref.tokens, [torch.zeros(1, 10)] * 2 + [torch.full((1, 10), float("nan"))] * 2, 1.0, [1.0] * 3)
    row = judge("x", Precision.FP32, Shape(1, 4), nan, ref, {}, 4)  # the same tokens, but from NaN
    assert row.status == "mismatch" and row.reason == "NaN or Inf in the logits at step 2"
    # below fp32 the bar is what eager reaches at that precision, less a margin
    eager_at = {Precision.BF16: {Shape(1, 4): 1.0}}
    assert judge("x", Precision.BF16, Shape(1, 4), off, ref, eager_at, 4).status == "mismatch"
    eager_at = {Precision.BF16: {Shape(1, 4): 0.75}}
    assert judge("x", Precision.BF16, Shape(1, 4), off, ref, eager_at, 4).status == "ok"


def test_generate_from_the_command_line_and_its_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny-gpt2", "--mode", "generate", "--backends", "eager", "--shapes", "1x8",
                 "--new-tokens", "4", "--rounds", "1", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "generate" and report["config"]["cache_len"] == 12 and report["results"][0]["status"] == "ok"
    assert "| eager | fp32 | 1x8 | ok | 4 |" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "report.csv").read_text().splitlines()))  # the markdown's columns, unformatted
    assert [(r["backend"], r["shape"], r["status"], r["tokens"]) for r in rows] == [("eager", "1x8", "ok", "4")]
    low, tps, high = (float(rows[0][k]) for k in ("decode_tokens_per_s_ci_low", "decode_tok_per_s", "decode_tokens_per_s_ci_high"))
    assert 0 < low <= tps <= high
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG") and "(report.png)" in (out / "report.md").read_text()
    for args, message in ((["--model", "tiny-bert"], "needs a causal LM; tiny-bert is encoder"),
                          (["--new-tokens", "0"], "generate at least one token"),
                          (["--cache-len", "10"], "need 12 cache positions; --cache-len is 10"),
                          (["--cache-len", "300"], "beyond tiny-gpt2's 256")):
        bad = tmp_path / "bad"
        argv = ["run", "--model", "tiny-gpt2", "--mode", "generate", "--backends", "eager", "--shapes", "1x8",
                "--new-tokens", "4", "--out", str(bad), "--quiet"]
        for i in range(0, len(args), 2):
            at = argv.index(args[i]) if args[i] in argv else None
            if at is None:
                argv += args[i:i + 2]
            else:
                argv[at + 1] = args[i + 1]
        assert main(argv) == 2
        assert message in capsys.readouterr().err and not bad.exists()
    assert main(["run", "--model", "tiny-gpt2", "--mode", "generate", "--save-engines", "--out", str(tmp_path / "s")]) == 2
    assert "deployable generation engines: kiln build --mode generate" in capsys.readouterr().err and not (tmp_path / "s").exists()
    # a cache that cannot fit is refused before anything is captured (gpt2: 12 layers x 768 wide, fp32)
    monkeypatch.setattr("pipeline.genrun.available_memory", lambda: 16 * 2**30)
    assert main(["run", "--model", "gpt2", "--mode", "generate", "--shapes", "64x1000", "--new-tokens", "24",
                 "--out", str(tmp_path / "m")]) == 2
    assert "a static cache of 1024 positions at batch 64 is 4.5 GiB and generation holds about four (18.0 GiB); " \
           "this machine has 16.0 GiB available" in capsys.readouterr().err and not (tmp_path / "m").exists()
    with pytest.raises(InputError, match="static cache of 1 positions"):
        capture_generation(load_model("tiny-gpt2"), 1)


@pytest.mark.slow
def test_int8_dynamic_generation_quantizes_every_linear_layer_and_inductor_keeps_its_tokens() -> None:
    from torchao.utils import TorchAOBaseTensor
    from transformers.pytorch_utils import Conv1D

    from pipeline.generate import _linear_from_conv1d, quantized_generation

    bundle = load_model("tiny-gpt2")
    # GPT-2's Conv1D layers become nn.Linear computing the same function, so the quantizer takes them
    import copy

    hf = bundle.module.model  # type: ignore[union-attr]
    linear = _linear_from_conv1d(copy.deepcopy(hf))
    assert not any(isinstance(m, Conv1D) for m in linear.modules())
    x = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert torch.allclose(linear(input_ids=x).logits, hf(input_ids=x).logits, atol=1e-5)
    programs = quantized_generation(bundle, 24)
    quantized = [m for m in programs.module.modules() if isinstance(m, torch.nn.Linear)]
    assert len(quantized) == 2 * 4 + 1 and all(isinstance(m.weight, TorchAOBaseTensor) for m in quantized)  # 4 per block + lm_head
    report = run(bundle, mode="generate", backends="eager,inductor,onnxruntime", precisions="int8-dynamic", shapes="1x8", device="cpu",
                 isolation="none", new_tokens=6, rounds=1)
    rows = {(r.backend, r.precision.value): r for r in report.results}
    eager, inductor = rows[("eager", "int8-dynamic")], rows[("inductor", "int8-dynamic")]
    assert eager.status == "ok" and eager.agreement is not None  # the int8 reference, against eager fp32
    assert inductor.status == "ok" and inductor.agreement is not None and inductor.agreement >= eager.agreement - 0.05
    assert rows[("onnxruntime", "int8-dynamic")].status == "unsupported"


class _AbortOnDecode(EagerModel):
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if inputs["input_ids"].shape[1] == 1:  # the decode step: one new token
            print("about to abort in the decode step", file=sys.stderr, flush=True)
            os.abort()
        return super().run(inputs)


class _AbortsDecoding(Backend):
    """Compiles the captured steps as eager does, but its decode step aborts in native code."""

    name = "aborts-decoding-for-test"
    support = {Precision.FP32: ok()}

    def _compile(self, captured: Any, spec: Any, shapes: Any) -> CompiledModel:
        return _AbortOnDecode(spec, captured.bundle.module.eval(), captured.program)

    def _load(self, directory: Any, spec: Any, manifest: Any) -> CompiledModel:
        raise NotImplementedError


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, int, str]:
    """One `kiln run --mode generate` over eager, a worker whose decode step aborts, and a worker
    that generates: (its output directory, exit code, stderr), shared by the two tests below."""
    out, err = tmp_path_factory.mktemp("generate-run"), io.StringIO()
    registry.register(_AbortsDecoding())
    try:
        with contextlib.redirect_stderr(err):
            rc = main(["run", "--model", "tiny-gpt2", "--mode", "generate", "--backends", "eager,aborts-decoding-for-test,exported-program",
                       "--shapes", "1x8", "--new-tokens", "6", "--rounds", "3", "--out", str(out), "--cache-dir", str(cache_dir),
                       "--quiet"])
    finally:
        registry.unregister("aborts-decoding-for-test")
    return out, rc, err.getvalue()


def test_a_decode_step_that_aborts_costs_its_row_only(generation_run: tuple[Path, int, str]) -> None:
    """Every backend but the reference generates in a worker process: a crash is a failed row naming
    the signal, the other rows (one of them from another worker) are kept, and the run exits 1."""
    out, rc, err = generation_run
    assert rc == 1 and "aborts-decoding-for-test fp32 crashed" in err
    r = Report.load(out / "report.json")
    aborted = r.find("aborts-decoding-for-test", "fp32", "1x8")
    assert aborted is not None and aborted.status == "failed" and aborted.crashed and "SIGABRT" in aborted.reason
    assert "about to abort in the decode step" in aborted.reason  # the last lines of the worker's stderr
    for ok in ("eager", "exported-program"):  # every engine's tokens and speeds: the build tests do every backend at 1x8, 2x8
        row = r.find(ok, "fp32", "1x8")
        assert row is not None and row.status == "ok", (ok, row)
        m = row.metrics
        assert m["first_divergence"] is None and row.agreement == 1.0 and row.max_abs is not None and row.max_abs < 1e-4  # logits
        assert m["prefill_ms"] and row.latency_ms and m["decode_tokens_per_s"] and m["e2e_tokens_per_s"] and row.speedup
        assert m["cache_bytes"] == 2 * 2 * 1 * 2 * 14 * 16 * 4  # k and v, 2 layers, 2 heads, 8 + 6 positions, 16 wide, fp32
    assert r.find("exported-program", "fp32", "1x8").peak_host_mb  # measured in its worker
    assert "| exported-program | fp32 | 1x8 | ok | 6 | 100% | none |" in (out / "report.md").read_text()


def test_kiln_check_gates_a_generation_report(generation_run: tuple[Path, int, str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    base, report = tmp_path / "baseline.json", generation_run[0] / "report.json"
    assert main(["check", str(report), "--baseline", str(base), "--update-baseline"]) == 0
    assert json.loads(base.read_text())["mode"] == "generate"
    assert main(["check", str(report), "--baseline", str(base)]) == 0
    capsys.readouterr()
    data = json.loads(report.read_text())
    worker = next(i for i, r in enumerate(data["results"]) if r["backend"] == "exported-program")
    fp32 = next(i for i, r in enumerate(data["results"]) if r["backend"] == "eager")

    def edited(name: str, path: str, value: Any) -> Path:
        d = copy.deepcopy(data)
        *keys, last = path.split(".")
        target: Any = d
        for k in keys:
            target = target[int(k)] if k.isdigit() else target[k]
        target[last] = value
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(d))
        return p

    sp = data["results"][worker]["speedup"]
    slower = edited("slower", f"results.{worker}.speedup", {k: v / 3 for k, v in sp.items()})  # decoding at a third of its speed
    assert main(["check", str(slower), "--baseline", str(base)]) == 1
    assert "| exported-program | fp32 | 1x8 | **regression** |" in capsys.readouterr().out
    diverged = edited("diverged", f"results.{fp32}.status", "mismatch")  # greedy tokens no longer eager fp32's
    assert main(["check", str(diverged), "--baseline", str(base)]) == 1
    assert "ok → mismatch (worse)" in capsys.readouterr().out
    other = edited("other", "model.name", "tiny-llama")
    assert main(["check", str(other), "--baseline", str(base)]) == 2
    assert "model 'tiny-gpt2' vs 'tiny-llama'" in capsys.readouterr().err
    forward = edited("forward", "mode", "forward")  # a forward report is not compared with a generation baseline
    assert main(["check", str(forward), "--baseline", str(base)]) == 2
    assert "mode 'generate' vs 'forward'" in capsys.readouterr().err
