"""Kiln's three extension axes, each one record registered from here without touching pipeline/:
a head (`pipeline.heads.register`), a precision (`Precision.define`) and a report column
(`pipeline.report.COLUMNS`). They go through the conformance contract (compile, judged against
eager and the fp64 shadow, save, reload) and a whole `run` whose report shows all three.
docs/extending.md walks through the same three records."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import backends as registry
from backends.base import ok
from helpers import word_tokenizer
from pipeline import run
from pipeline.capture import Captured, capture
from pipeline.heads import HEADS, Head, register
from pipeline.inputs import Shape
from pipeline.models import load_model
from pipeline.precision import Precision, Tolerance
from pipeline.predict import Predictor
from pipeline.references import References
from pipeline.report import COLUMNS, Column
from plugin_backend import ExportedProgramBackend, ExportedProgramModel

SHAPES = (Shape(3, 8), Shape(4, 12))


def rank_agreement(a: dict[str, Any], c: torch.Tensor, r: torch.Tensor, e: torch.Tensor, valid: torch.Tensor,
                   mask: torch.Tensor | None) -> None:
    """A regression head's agreement: the rows come in the same order by their score."""
    if c.dim() == 2 and c.shape[-1] == 1 and c.shape[0] >= 2:
        a["kind"] = "rank"
        order = lambda x: x[:, 0].argsort().argsort()  # noqa: E731
        a["agree"].append((order(c) == order(r)).double())
        a["eager_agree"].append((order(e) == order(r)).double())


def score_answer(q: Any) -> list[dict[str, Any]]:
    return [{"text": t, "score": round(float(v), 6)} for t, v in zip(q.texts, q.first[:, 0])]


@pytest.fixture
def extended() -> Iterator[tuple[Precision, type[ExportedProgramBackend]]]:
    """The three records and a backend whose support table names the new precision; all removed after."""
    head = register(Head("regression", "AutoModelForSequenceClassification", agreement=rank_agreement, answer=score_answer))
    strict = Precision.define("fp32-strict", "float32", Tolerance(atol=1e-6, rtol=1e-6, min_cosine=0.999999, min_agreement=1.0))
    column = Column("tail p99/p50", lambda r: r.latency_ms.p99 / r.latency_ms.median if r.latency_ms else None, ".2f",
                    csv="tail_ratio")
    COLUMNS["forward"].append(column)

    class Strict(ExportedProgramBackend):
        name = "strict-plugin"
        support = {Precision.FP32: ok(), strict: ok()}

    registry.register(Strict())
    try:
        yield strict, Strict
    finally:
        registry.unregister("strict-plugin")
        COLUMNS["forward"].remove(column)
        del Precision._known[strict.value]
        del HEADS[head.name]


class _Nudged(ExportedProgramModel):
    """Every output moved by 3e-5: inside fp32's tolerance (atol 1e-4), outside fp32-strict's (1e-6)."""

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v + 3e-5 for k, v in super().run(inputs).items()}


@pytest.fixture
def regression_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=1)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "m")
    word_tokenizer(tmp_path / "m", "right")
    return tmp_path / "m"


def test_a_head_a_precision_and_a_column_registered_from_tests_run_end_to_end(extended: Any, regression_dir: Path,
                                                                             tmp_path: Path) -> None:
    strict, Strict = extended
    bundle = load_model(regression_dir, task="regression")
    assert bundle.task == "regression" and bundle.output_names == ("logits",)
    captured: Captured = capture(bundle, tmp_path / "cache")
    backend = registry.get("strict-plugin")
    assert backend.supports(strict, "cpu") and not registry.get("eager").supports(strict, "cpu")

    # the conformance contract at the new precision, judged by the new head's agreement
    refs = References.compute(bundle, SHAPES, [strict])
    model = backend.compile(captured, strict, "cpu", None, SHAPES)
    verdict = refs.judge(model, SHAPES, strict)
    assert verdict.passed, verdict.reason
    out = verdict.outputs[0]
    assert out.agreement_kind == "rank" and out.agreement == 1.0 and out.atol < Precision.FP32.tolerance.atol  # its own
    # the precision's own tolerance is what judges: a 3e-5 error passes at fp32 and fails at fp32-strict
    spec = backend.spec(captured, strict, "cpu", backend.options())
    nudged = _Nudged(spec, captured.program_at(strict))
    assert not refs.judge(nudged, SHAPES, strict).passed
    fp32_refs = References.compute(bundle, SHAPES, [Precision.FP32])
    fp32_spec = backend.spec(captured, Precision.FP32, "cpu", backend.options())
    assert fp32_refs.judge(_Nudged(fp32_spec, captured.program_at(Precision.FP32)), SHAPES, Precision.FP32).passed
    # saved and reloaded as any engine: the manifest names the new precision
    model.save(tmp_path / "engine")
    again = backend.load(tmp_path / "engine")
    assert again.spec.precision is strict and refs.judge(again, SHAPES, strict).passed

    # the head answers in predict, in its own form
    tokenizer = transformers.AutoTokenizer.from_pretrained(regression_dir)
    tokenizer.pad_token = "<pad>"  # the helper's word tokenizer is GPT-style, without one
    predictor = Predictor(model, tokenizer, "regression", dict(bundle.axis_ranges))
    answers = predictor.predict(["a short one", "and another sentence here"])
    assert [sorted(a) for a in answers] == [["score", "text"]] * 2 and answers[0]["score"] != answers[1]["score"]

    # a whole run: the new precision's rows, the head's agreement and the new column in every report file
    report = run(regression_dir, task="regression", backends="strict-plugin", precisions="fp32,fp32-strict",
                 shapes="3x8", rounds=3, warmup=1, isolation="none", out=tmp_path / "run", cache_dir=tmp_path / "cache")
    row = report.find("strict-plugin", "fp32-strict", "3x8")
    assert row is not None and row.status == "ok" and row.agreement_kind == "rank", row
    eager = report.find("eager", "fp32-strict", "3x8")
    assert eager is not None and eager.status == "unsupported" and "eager supports fp32" in eager.reason
    md, csv = (tmp_path / "run" / "report.md").read_text(), (tmp_path / "run" / "report.csv").read_text()
    assert "tail p99/p50" in md and "| strict-plugin | fp32-strict | 3x8 | ok |" in md
    assert csv.splitlines()[0].split(",")[-1] == "tail_ratio"


def test_a_precision_is_one_record_per_name() -> None:
    """What a worker receives is the same record (pickled by name); a name is defined once, and
    only one the command line can spell."""
    import pickle

    from pipeline.errors import UnknownChoiceError

    assert Precision("fp16") is Precision.FP16 and pickle.loads(pickle.dumps(Precision.INT8)) is Precision.INT8
    assert Precision.FP16 == "fp16" and str(Precision.INT8_DYNAMIC) == "int8-dynamic" and Precision.BF16.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="already defined"):
        Precision.define("fp16", "float16", Precision.FP16.tolerance)
    with pytest.raises(ValueError, match="lower case"):
        Precision.define("FP8,e4m3", "float8_e4m3fn", Precision.FP16.tolerance)
    with pytest.raises(UnknownChoiceError, match="unknown precision 'fp8'; valid: bf16, fp16, fp32, int8, int8-dynamic"):
        Precision.parse("fp8")
