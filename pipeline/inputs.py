"""Example inputs: real sentences through the tokenizer, random ids, padding-heavy masks, shapes."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources

import torch

from .choices import Shape, parse_shapes
from .errors import InputError, ShapeError
from .models import InputSpec, ModelBundle

Inputs = dict[str, torch.Tensor]
BATCH_KINDS = ("text", "random", "padded")


def check_shape(bundle: ModelBundle, shape: Shape) -> None:
    """Refuses a shape outside the model's dynamic ranges, naming the range, and a shape of the
    wrong kind (a sequence length for an image model, none for a text model)."""
    if "seq" in bundle.axis_ranges and not shape.seq:
        raise ShapeError(f"shape {shape}: {bundle.name} takes text: give BATCHxSEQ, e.g. {shape.batch}x128")
    if "seq" not in bundle.axis_ranges and shape.seq and bundle.vision:
        raise ShapeError(f"shape {shape}: {bundle.name} takes images at its own size: give a batch size, e.g. --shapes 1,8")
    for axis, size in (("batch", shape.batch), ("seq", shape.seq)):
        lo, hi = bundle.axis_ranges.get(axis, (size, size))
        if axis in bundle.axis_ranges and not lo <= size <= hi:
            raise ShapeError(f"shape {shape}: {axis} {size} is outside {bundle.name}'s range [{lo}, {hi}]")


def check_inputs(specs: Mapping[str, InputSpec], ranges: Mapping[str, tuple[int, int]], inputs: Mapping[str, torch.Tensor],
                 who: str) -> None:
    """Refuses, before any engine's native code sees them, inputs of the wrong dtype or rank, a
    dynamic axis outside its range or sized differently between inputs, a static dim that
    differs, and integer ids outside a bounded range (an out-of-vocabulary id would make an
    embedding gather read outside its table, which some compilers do not bounds-check)."""
    sizes: dict[str, tuple[str, int]] = {}
    for name, spec in specs.items():
        t = inputs[name]
        if t.dtype != spec.dtype:
            raise InputError(f"{who}: input {name!r} is {str(t.dtype).removeprefix('torch.')}, "
                             f"expected {str(spec.dtype).removeprefix('torch.')}")
        if t.dim() != len(spec.dims):
            raise InputError(f"{who}: input {name!r} has {t.dim()} dims {tuple(t.shape)}, expected {len(spec.dims)} ({', '.join(map(str, spec.dims))})")
        for size, axis in zip(t.shape, spec.dims):
            if isinstance(axis, int):
                if size != axis:
                    raise ShapeError(f"{who}: input {name!r} has shape {tuple(t.shape)}; its dims are ({', '.join(map(str, spec.dims))})")
                continue
            lo, hi = ranges.get(axis, (1, 2**62))
            if not lo <= size <= hi:
                raise ShapeError(f"{who}: input {name!r}: {axis} {size} is outside the built range [{lo}, {hi}]")
            first = sizes.setdefault(axis, (name, int(size)))
            if first[1] != size:
                raise ShapeError(f"{who}: {axis} is {first[1]} in {first[0]!r} but {size} in {name!r}")
        if spec.bounded and t.numel() and not (spec.dtype.is_floating_point or spec.dtype == torch.bool):
            lo_v, hi_v = int(t.min()), int(t.max())
            if lo_v < 0 or hi_v >= spec.high:
                what = "the vocabulary size" if name == "input_ids" else "its range"
                raise InputError(f"{who}: input {name!r} holds values in [{lo_v}, {hi_v}]; valid values are 0 to "
                                 f"{spec.high - 1} ({what} is {spec.high})")


def sentences() -> list[str]:
    text = resources.files("pipeline").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def make_inputs(bundle: ModelBundle, shape: Shape, kind: str = "random", seed: int = 0) -> Inputs:
    """One seeded batch at `shape`.

    text:   real sentences through the tokenizer, padded to seq (random ids if no tokenizer);
    random: uniform ids, full mask;
    padded: uniform ids, most rows padded to a quarter of seq or less (right padding).
    """
    check_shape(bundle, shape)
    g = torch.Generator().manual_seed(seed * 1009 + shape.batch * 31 + shape.seq)
    if bundle.task == "generic":
        return _generic_inputs(bundle, shape, g)
    if bundle.vision:
        return {"pixel_values": _images(bundle, shape.batch, kind, g)}
    vocab = bundle.inputs["input_ids"].high
    n = shape.batch * bundle.options  # a multiple-choice row's options are rows of their own, reshaped at the end
    ids = torch.randint(0, vocab, (n, shape.seq), generator=g)
    mask = torch.ones_like(ids)
    if kind == "text" and bundle.tokenizer is not None:
        sents = sentences()
        rows = [sents[(seed + i) % len(sents)] for i in range(n)]
        enc = bundle.tokenizer(rows, padding="max_length", truncation=True, max_length=shape.seq, return_tensors="pt")
        ids, mask = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
    elif kind in ("padded", "text"):
        # Every row keeps at least one real token, as a tokenizer's output does (a row masked
        # whole is NaN in some attention implementations, the fp64 reference's included), and
        # padding sits on the side the model's tokenizer puts it.
        hi = max(1, shape.seq // 4) if kind == "padded" else shape.seq
        lengths = torch.randint(1, hi + 1, (n,), generator=g)
        lengths[0] = shape.seq if kind == "padded" and n > 1 else lengths[0]
        pos = torch.arange(shape.seq).unsqueeze(0)
        real = pos >= shape.seq - lengths.unsqueeze(1) if bundle.padding_side == "left" else pos < lengths.unsqueeze(1)
        mask = real.to(torch.int64)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, bundle.pad_token_id))
    elif kind != "random":
        raise ValueError(f"unknown batch kind {kind!r}; valid: {', '.join(BATCH_KINDS)}")
    dims = (shape.batch, bundle.options, shape.seq) if bundle.options > 1 else (shape.batch, shape.seq)
    return {"input_ids": ids.view(dims), "attention_mask": mask.view(dims)}


def _images(bundle: ModelBundle, batch: int, kind: str, g: torch.Generator) -> torch.Tensor:
    """Seeded images at the model's size, normalized as its image processor would (ImageNet's 0.5
    mean and std without one). "random" is pixel noise; the other kinds are smooth fields with
    texture, closer to photographs: low-resolution colour blobs upsampled, plus fine noise."""
    _, c, h, w = bundle.inputs["pixel_values"].dims
    assert isinstance(c, int) and isinstance(h, int) and isinstance(w, int)
    if kind == "random":
        pixels = torch.rand(batch, c, h, w, generator=g)
    else:
        blobs = torch.rand(batch, c, max(2, h // 8), max(2, w // 8), generator=g)
        pixels = torch.nn.functional.interpolate(blobs, size=(h, w), mode="bilinear", align_corners=False)
        pixels = (pixels + 0.05 * torch.randn(batch, c, h, w, generator=g)).clamp(0, 1)
    proc = bundle.processor
    mean = torch.tensor(getattr(proc, "image_mean", None) or [0.5] * c, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(getattr(proc, "image_std", None) or [0.5] * c, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels - mean) / std


def _generic_inputs(bundle: ModelBundle, shape: Shape, g: torch.Generator) -> Inputs:
    sizes = {"batch": shape.batch, "seq": shape.seq}
    out: Inputs = {}
    for name, spec in bundle.inputs.items():
        dims = tuple(sizes.get(d, 1) if isinstance(d, str) else d for d in spec.dims)
        if spec.dtype.is_floating_point:
            out[name] = torch.randn(dims, generator=g).to(spec.dtype)
        elif spec.dtype == torch.bool:
            out[name] = torch.randint(0, 2, dims, generator=g).bool()
        else:
            out[name] = torch.randint(0, spec.high, dims, generator=g).to(spec.dtype)
    return out
