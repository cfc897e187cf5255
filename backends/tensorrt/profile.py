"""Optimization profiles, shared by both TensorRT backends: the (min, opt, max) shape of every input,
from the user's bounds or the run's shapes, and the check that refuses a call outside them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputError, ShapeError
from pipeline.inputs import Shape
from pipeline.models import ModelBundle

from ..base import BackendOptions

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)


@dataclass(frozen=True)
class ProfileOptions(BackendOptions):
    """Options shared by both TensorRT backends: profile bounds and the builder optimization level."""

    optimization_level: int | None = None  # builder_optimization_level, 0..5; None: TensorRT's default (3)
    # Profile bounds as BATCHxSEQ; unset ones come from the run's shapes (min, largest, max).
    profile_min: str | None = None
    profile_opt: str | None = None
    profile_max: str | None = None

    def __post_init__(self) -> None:
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise InputError(f"optimization_level {self.optimization_level} is outside 0..5")
        for value in (self.profile_min, self.profile_opt, self.profile_max):
            if value is not None:
                Shape.parse(value)


def profile_shapes(bundle: ModelBundle, shapes: Sequence[Shape], options: ProfileOptions) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) over batch and seq: the user's bounds where given, else the run's shapes
    (elementwise min, the largest, elementwise max), else the model's whole range with opt 1x128."""
    ranges = bundle.axis_ranges
    lo_b, hi_b = ranges.get("batch", (1, 1))
    lo_s, hi_s = ranges.get("seq", (1, 1))
    if shapes:
        auto = (Shape(min(s.batch for s in shapes), min(s.seq for s in shapes)), max(shapes, key=lambda s: s.batch * s.seq),
                Shape(max(s.batch for s in shapes), max(s.seq for s in shapes)))
    else:
        auto = (Shape(lo_b, lo_s), Shape(min(max(1, lo_b), hi_b), min(max(128, lo_s), hi_s)), Shape(hi_b, hi_s))
    chosen = tuple(Shape.parse(v) if v else a for v, a in zip((options.profile_min, options.profile_opt, options.profile_max), auto))
    mn, opt, mx = chosen
    if not (mn.batch <= opt.batch <= mx.batch and mn.seq <= opt.seq <= mx.seq):
        raise ShapeError(f"profile must satisfy min <= opt <= max per axis; got min {mn}, opt {opt}, max {mx}")
    if mn.batch < lo_b or mx.batch > hi_b or mn.seq < lo_s or mx.seq > hi_s:
        raise ShapeError(f"profile {mn}..{mx} leaves {bundle.name}'s range batch [{lo_b}, {hi_b}], seq [{lo_s}, {hi_s}]")
    return mn, opt, mx


def input_profile(bundle: ModelBundle, bounds: tuple[Shape, Shape, Shape]) -> Profile:
    """Per input, the (min, opt, max) dims TensorRT's IOptimizationProfile.set_shape takes."""
    out: Profile = {}
    for name, spec in bundle.inputs.items():
        dims = [tuple(getattr(b, d) if isinstance(d, str) and d in ("batch", "seq") else (1 if isinstance(d, str) else d)
                      for d in spec.dims) for b in bounds]
        out[name] = (dims[0], dims[1], dims[2])
    return out


def check_shapes(profile: Profile, inputs: dict[str, tuple[int, ...]]) -> None:
    """Refuses, before TensorRT sees it, an input shape outside the engine's profile."""
    for name, shape in inputs.items():
        if name not in profile:
            raise InputError(f"input {name!r} is not an engine input; inputs: {', '.join(profile)}")
        mn, _, mx = profile[name]
        if len(shape) != len(mn) or any(not lo <= s <= hi for s, lo, hi in zip(shape, mn, mx)):
            raise ShapeError(f"input {name!r} has shape {tuple(shape)}, outside the engine's profile "
                             f"{tuple(mn)}..{tuple(mx)}; rebuild with --option tensorrt.profile_max=BxS (or _min)")


def profile_to_json(profile: Profile) -> dict[str, list[list[int]]]:
    return {k: [list(d) for d in v] for k, v in profile.items()}


def profile_from_json(raw: Any) -> Profile:
    return {k: (tuple(v[0]), tuple(v[1]), tuple(v[2])) for k, v in raw.items()}


def max_batch(profile: Profile) -> int:
    """The largest batch every input's profile admits (the leading dim of each max shape)."""
    return min(int(mx[0]) for _, _, mx in profile.values())
