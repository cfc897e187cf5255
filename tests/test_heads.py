"""Heads kept: a directory loads with the head its config names (or --task), outputs named after
what the head returns, agreement that follows the head; encoder-decoders refused; hub ids from
the local cache only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from pipeline.cli import main
from pipeline.compare import Comparator
from pipeline.errors import InputError
from pipeline.inputs import Shape, make_inputs
from pipeline.models import load_model
from pipeline.precision import Precision

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128)


def _save(tmp: Path, cls: Any, **config: Any) -> Path:
    torch.manual_seed(0)
    cls(transformers.BertConfig(**TINY, **config)).save_pretrained(tmp)
    return tmp


@pytest.mark.parametrize("cls, task, outputs", [
    (transformers.BertForSequenceClassification, "classification", ("logits",)),
    (transformers.BertForTokenClassification, "token-classification", ("logits",)),
    (transformers.BertForQuestionAnswering, "question-answering", ("start_logits", "end_logits")),
    (transformers.BertForMaskedLM, "masked-lm", ("logits",)),
    (transformers.BertModel, "encoder", ("last_hidden_state",)),
])
def test_a_directory_keeps_its_head(cls: Any, task: str, outputs: tuple[str, ...], tmp_path: Path) -> None:
    bundle = load_model(_save(tmp_path, cls, num_labels=2 if task == "question-answering" else 3))
    assert bundle.task == task and bundle.output_names == outputs
    x = make_inputs(bundle, Shape(2, 8), "random")
    with torch.no_grad():
        got = bundle.module(**x)
        want = cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval()(**x, position_ids=torch.arange(8).expand(2, 8),
                                                                                token_type_ids=torch.zeros_like(x["input_ids"]))
    for name, t in zip(outputs, got):
        assert torch.allclose(t, getattr(want, name), atol=1e-5)  # the head ran: not the trunk's hidden states
    if task == "classification":
        assert bundle.summary["labels"] == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


def test_task_overrides_the_head_and_is_checked(tmp_path: Path) -> None:
    path = _save(tmp_path, transformers.BertForSequenceClassification, num_labels=2)
    trunk = load_model(path, task="encoder")
    assert trunk.output_names == ("last_hidden_state",) and trunk.load_task == "encoder"
    with pytest.raises(InputError, match="unknown task 'summarize'"):
        load_model(path, task="summarize")
    with pytest.raises(InputError, match="--task applies to a model directory"):
        load_model("tiny-bert", task="encoder")


def test_an_encoder_decoder_checkpoint_is_refused_with_the_way_out(tmp_path: Path) -> None:
    transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=100, d_model=16, d_ff=32, num_layers=1,
                                                                  num_heads=2, d_kv=8)).save_pretrained(tmp_path)
    with pytest.raises(InputError, match=r"encoder-decoder checkpoint \(T5ForConditionalGeneration\).*T5EncoderModel"):
        load_model(tmp_path)


def test_label_and_span_agreement() -> None:
    ref = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    cand = torch.tensor([[2.0, 1.0], [0.0, 3.0], [0.0, 1.0], [0.0, 1.0]])  # row 2 flips its label
    comp = Comparator(Precision.FP16, "classification")
    comp.add({"logits": cand}, {"logits": ref}, {"logits": ref.double()})
    m = comp.result().outputs[0]
    assert m.agreement_kind == "label" and m.agreement == pytest.approx(0.75)
    start = torch.tensor([[0.0, 5.0, 1.0, 9.0], [3.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # position 3 of row 0 is padding: never a span boundary
    comp = Comparator(Precision.FP32, "question-answering")
    comp.add({"start_logits": start}, {"start_logits": start}, {"start_logits": start.double()}, None, mask)
    m = comp.result().outputs[0]
    assert m.agreement_kind == "span" and m.agreement == 1.0


def test_the_classifier_zoo_entry_runs_with_label_agreement(tmp_path: Path, capsys: Any) -> None:
    code = main(["run", "--model", "tiny-distilbert-sst2", "--backends", "onnxruntime", "--shapes", "4x16", "--isolation", "none",
                 "--warmup", "1", "--rounds", "3", "--quiet", "--json", "--out", str(tmp_path / "run")])
    report = json.loads(capsys.readouterr().out)  # --json: the report on stdout, for scripts
    assert code == 0 and report["model"]["task"] == "classification" and report["model"]["outputs"] == ["logits"]
    for r in report["results"]:
        assert r["status"] == "ok" and r["agreement_kind"] == "label" and r["agreement"] == 1.0, r["reason"]
        assert r["throughput"]["samples_per_s"] > 0 and r["throughput"]["tokens_per_s"] == pytest.approx(16 * r["throughput"]["samples_per_s"])
        assert {"p95", "p99", "mean", "stdev"} <= set(r["latency_ms"])


def _fake_cache(root: Path, repo_id: str) -> Path:
    """A model in huggingface_hub's cache layout, as a download would leave it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return _save(repo / "snapshots" / commit, transformers.BertForSequenceClassification, num_labels=2)


def test_a_hub_id_resolves_through_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from huggingface_hub import constants

    # huggingface_hub reads $HF_HUB_CACHE once, at import: the cache directory this process would have had
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_cache(tmp_path / "hub", "kiln-test/tiny-cls")
    bundle = load_model("kiln-test/tiny-cls")
    assert bundle.name == "tiny-cls" and bundle.task == "classification" and bundle.spec == "kiln-test/tiny-cls"
    with pytest.raises(InputError, match=r"kiln-test/absent is not in the Hugging Face cache at .*hub and Kiln never downloads"):
        load_model("kiln-test/absent")
    out = tmp_path / "run"
    capsys.readouterr()  # what loading the cached model printed
    assert main(["run", "--model", "kiln-test/absent", "--backends", "eager", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kiln-test/absent" in err[0] and not out.exists()


def test_an_int8_classifier_is_judged_by_its_labels() -> None:
    """Two logits near zero: their cosine swings with tiny changes while every label holds."""
    ref = torch.tensor([[0.02, -0.01], [-0.03, 0.01], [0.05, 0.00], [0.00, 0.04]])
    cand = ref + torch.tensor([[0.0, 0.02], [0.02, 0.0], [-0.03, 0.0], [0.02, 0.0]])
    comp = Comparator(Precision.INT8, "classification")
    comp.add({"logits": cand}, {"logits": ref}, {"logits": ref.double()}, {"logits": ref}, None)
    m = comp.result().outputs[0]
    assert m.cosine < 0.95 and m.agreement == 1.0 and m.passed, m.reason
    flipped = ref.clone()
    flipped[0] = flipped[0].flip(0)
    comp = Comparator(Precision.INT8, "classification")
    comp.add({"logits": flipped}, {"logits": ref}, {"logits": ref.double()}, {"logits": ref}, None)
    assert not comp.result().passed  # one label in four lost: 75% < the int8 floor


def test_pixel_agreement_and_the_labels_a_segmenter_answers() -> None:
    from pipeline.heads import HEADS, Asked

    ref = torch.zeros(2, 3, 4, 4)
    ref[:, 1, :2] = 1.0  # the top half is label 1, the bottom label 0
    cand = ref.clone()
    cand[1, 2, 3, 3] = 5.0  # one pixel of image 1 flips to label 2
    comp = Comparator(Precision.FP16, "semantic-segmentation")
    comp.add({"logits": cand}, {"logits": ref}, {"logits": ref.double()})
    m = comp.result().outputs[0]
    assert m.agreement_kind == "pixel-label" and m.agreement == pytest.approx((1 + 15 / 16) / 2)
    answer = HEADS["semantic-segmentation"].answer
    assert answer is not None
    got = answer(Asked(["a.png", "b.png"], cand, None, None, None, {0: "road", 1: "sky"}))
    assert got[0] == {"image": "a.png", "labels": {"road": 0.5, "sky": 0.5}}
    assert got[1] == {"image": "b.png", "labels": {"sky": 0.5, "road": 0.4375, "2": 0.0625}}
