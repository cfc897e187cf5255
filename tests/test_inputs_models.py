"""Models, inputs, shapes, capture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.capture import capture, graph_hash
from pipeline.errors import InputError, ShapeError, UnknownChoiceError
from pipeline.inputs import Shape, make_inputs, parse_shapes, sentences
from pipeline.models import ModelBundle, load_model


def test_shapes_parse_and_refuse_malformed() -> None:
    assert parse_shapes("1x128, 8X64,1x128") == [Shape(1, 128), Shape(8, 64)]
    for bad in ("1x", "x8", "0x8", "8*8", "a"):
        with pytest.raises(ShapeError, match="BATCHxSEQ"):
            Shape.parse(bad)


def test_shape_outside_the_models_range(tiny_bert: ModelBundle) -> None:
    with pytest.raises(ShapeError, match=r"seq 300 is outside tiny-bert's range \[1, 256\]"):
        make_inputs(tiny_bert, Shape(1, 300))


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(UnknownChoiceError, match="valid: .*minilm-l6"):
        load_model("resnet50")


def test_batches_are_seeded_and_of_three_kinds(tiny_bert: ModelBundle) -> None:
    s = Shape(4, 32)
    text, rand, padded = (make_inputs(tiny_bert, s, k, seed=i) for i, k in enumerate(("text", "random", "padded")))
    assert torch.equal(text["input_ids"], make_inputs(tiny_bert, s, "text", seed=0)["input_ids"])
    assert text["input_ids"][0, 0] == 101  # [CLS]: real sentences through MiniLM's tokenizer
    assert rand["attention_mask"].all()
    lengths = padded["attention_mask"].sum(1)
    assert lengths[0] == 32 and (lengths[1:] <= 8).all()  # padding-heavy
    assert len(sentences()) >= 8


def test_hf_directory_loads(tmp_path: Path, tiny_bert: ModelBundle) -> None:
    tiny_bert.module.model.save_pretrained(tmp_path / "m")
    b = load_model(tmp_path / "m")
    assert b.task == "encoder" and b.source.startswith("dir:")
    x = make_inputs(b, Shape(2, 8))
    with torch.no_grad():
        assert torch.allclose(b.module(**x)[0], tiny_bert.module(**x)[0])


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no config.json"):
        load_model(tmp_path)


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": self.lin(x).relu(), "z": x.sum(-1)}


def test_any_module_with_example_inputs(cache_dir: Path) -> None:
    torch.manual_seed(0)
    b = ModelBundle.from_module(_Mlp(), {"x": torch.randn(2, 8)}, name="mlp", dynamic_axes={"x": {0: "batch"}})
    assert b.output_names == ("y", "z") and b.inputs["x"].dims == ("batch", 8)
    c = capture(b, cache_dir)
    x = make_inputs(b, Shape(5, 1))
    assert x["x"].shape == (5, 8)
    out = c.program.module()(**x)
    assert torch.allclose(out[0], b.module(**x)[0])


def test_graph_hash_is_content_addressed(tiny_bert: ModelBundle) -> None:
    a = capture(tiny_bert)
    assert graph_hash(capture(tiny_bert).program) == a.graph_hash
    other = load_model("tiny-bert")
    with torch.no_grad():
        next(other.module.parameters()).add_(1e-3)
    assert capture(other).graph_hash != a.graph_hash


def test_onnx_export_is_cached(tiny_captured) -> None:  # type: ignore[no-untyped-def]
    p = tiny_captured.onnx_path()
    mtime = p.stat().st_mtime_ns
    assert tiny_captured.onnx_path() == p and p.stat().st_mtime_ns == mtime
    assert tiny_captured.graph_hash in str(p)


def test_a_multiple_choice_row_holds_its_options_in_every_input_kind_and_calibration(tmp_path: Path) -> None:
    import transformers

    from pipeline.calibration import calibration_batches
    from pipeline.choices import QuantSpec

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.BertForMultipleChoice(config).save_pretrained(tmp_path)
    bundle = load_model(str(tmp_path))
    assert bundle.task == "multiple-choice" and bundle.options == 4
    assert bundle.inputs["input_ids"].dims == ("batch", 4, "seq")
    bundle.tokenizer = load_model("tiny-bert").tokenizer  # BERT's vocabulary: real sentences, one per option
    for kind in ("text", "random", "padded"):
        x = make_inputs(bundle, Shape(2, 16), kind)
        assert {k: tuple(v.shape) for k, v in x.items()} == {"input_ids": (2, 4, 16), "attention_mask": (2, 4, 16)}
        assert len({tuple(row.tolist()) for row in x["input_ids"].flatten(0, 1)}) == 8  # no option repeats another
        assert tuple(bundle.module(**x)[0].shape) == (2, 4)  # a score per option
    batches = calibration_batches(bundle, QuantSpec(samples=16))
    assert [tuple(b["input_ids"].shape)[:2] for b in batches] == [(8, 4), (8, 4)]
