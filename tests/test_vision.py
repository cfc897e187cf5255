"""Vision Transformers: pixel_values at the config's image size, shapes as batch sizes, seeded
picture-like inputs normalized as the model's image processor says, label agreement, and an
artifact that answers image files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from pipeline.build import build
from pipeline.cli import main
from pipeline.errors import InputError, ShapeError
from pipeline.inputs import Shape, make_inputs, parse_shapes
from pipeline.models import load_model


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vit") / "tiny-vit"
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fish"},
                                    label2id={"cat": 0, "dog": 1, "fish": 2})
    transformers.ViTForImageClassification(config).save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.45, 0.5],
                                   image_std=[0.2, 0.25, 0.3]).save_pretrained(path)
    return path


def test_an_image_model_takes_pixels_at_its_size_and_batch_sizes_as_shapes(vit_dir: Path) -> None:
    bundle = load_model(str(vit_dir))
    assert bundle.task == "image-classification" and bundle.vision and bundle.output_names == ("logits",)
    assert bundle.inputs["pixel_values"].dims == ("batch", 3, 32, 32) and "seq" not in bundle.axis_ranges
    assert bundle.summary["labels"] == {0: "cat", 1: "dog", 2: "fish"}
    assert parse_shapes("1,8") == [Shape(1), Shape(8)] and str(Shape(8)) == "8"
    x = make_inputs(bundle, Shape(4), "text")["pixel_values"]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    # normalized with the processor's mean and std: the pixels behind it are in [0, 1]
    mean, std = torch.tensor([0.4, 0.45, 0.5]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    pixels = x * std + mean
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    # picture-like: neighbouring pixels agree far more than in noise
    noise = make_inputs(bundle, Shape(4), "random")["pixel_values"] * std + mean
    smooth = lambda t: float((t[..., 1:] - t[..., :-1]).abs().mean())  # noqa: E731
    assert smooth(pixels) < 0.5 * smooth(noise)
    assert torch.equal(x, make_inputs(bundle, Shape(4), "text")["pixel_values"])  # seeded
    with pytest.raises(ShapeError, match="takes images at its own size: give a batch size"):
        make_inputs(bundle, Shape(1, 128))
    with pytest.raises(ShapeError, match="takes text: give BATCHxSEQ"):
        make_inputs(load_model("tiny-bert"), Shape(8))


def test_a_text_task_on_an_image_model_is_refused(vit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match="holds an image model; its tasks are image-classification, semantic-segmentation, image-encoder"):
        load_model(str(vit_dir), task="classification")
    out = tmp_path / "run"
    assert main(["run", "--model", str(vit_dir), "--shapes", "1x128", "--backends", "eager", "--out", str(out)]) == 2
    assert "give a batch size" in capsys.readouterr().err and not out.exists()


def test_build_an_image_classifier_and_predict_labels_of_image_files(vit_dir: Path, tmp_path: Path,
                                                                     cache_dir: Path) -> None:
    from PIL import Image

    out = build(str(vit_dir), "onnxruntime", shapes="1,4", root=tmp_path / "artifacts", cache_dir=cache_dir,
                isolation="none", warmup=0, rounds=1)
    assert [(o.backend, o.status) for o in out] == [("onnxruntime", "built")], out[0].reason
    art = out[0].path
    meta = json.loads((art / "manifest.json").read_text())
    assert "preprocessor_config.json" in meta["processor"] and "preprocessor_config.json" in meta["files"]
    images = []
    for i, colour in enumerate([(250, 10, 10), (10, 200, 30), (20, 20, 240)]):
        Image.new("RGB", (50 + 10 * i, 40), colour).save(tmp_path / f"{i}.png")  # any size: the processor resizes
        images.append(str(tmp_path / f"{i}.png"))
    res = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(art), *images], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    answers = [json.loads(line) for line in res.stdout.splitlines()]
    assert [a["image"] for a in answers] == images and all(a["label"] in ("cat", "dog", "fish") for a in answers)
    # the same labels as the model itself on the processor's pixels
    model = transformers.ViTForImageClassification.from_pretrained(vit_dir).eval()
    proc = transformers.ViTImageProcessor.from_pretrained(vit_dir)
    with torch.no_grad():
        want = model(**proc(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")).logits.argmax(-1)
    assert [a["label"] for a in answers] == [model.config.id2label[int(i)] for i in want]
    bad = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(art), str(tmp_path / "missing.png")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot read image" in bad.stderr
    # pixels at a size the engine was not built for never reach it
    from pipeline import store

    engine = store.load(art)
    with pytest.raises(ShapeError, match=r"input 'pixel_values' has shape \(1, 3, 48, 48\); its dims are \(batch, 3, 32, 32\)"):
        engine({"pixel_values": torch.zeros(1, 3, 48, 48)})
