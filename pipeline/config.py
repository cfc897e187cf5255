"""A run's configuration: user input in, a frozen RunConfig out; every name checked before any work starts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import backends as registry

from .choices import DEFAULTS, QuantSpec, Shape, check_device, parse_shapes
from .errors import InputError
from .precision import Precision, Tolerance, parse_precisions

if TYPE_CHECKING:
    from backends.base import BackendOptions

REFERENCE = ("eager", Precision.FP32)  # every speedup is measured against it, in the same run


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs. `backends` are the ones asked for; `engines` adds the reference."""

    backends: tuple[str, ...]
    precisions: tuple[Precision, ...]
    shapes: tuple[Shape, ...]
    device: str
    options: Mapping[str, BackendOptions] = field(default_factory=dict)
    warmup: int = DEFAULTS["run"].warmup
    rounds: int = DEFAULTS["run"].rounds
    tolerances: Tolerance | Mapping[str, Tolerance] | None = None
    save_engines: Path | None = None
    # "process": every backend but the reference compiles, checks and runs in a worker process of
    # its own, so a native crash costs one row; "none": all in this process (for debugging).
    isolation: Literal["process", "none"] = "process"
    timeout_s: float = DEFAULTS["run"].timeout_s  # the longest one worker request may take (tuning included)
    quant: QuantSpec = field(default_factory=QuantSpec)  # how int8 precisions are calibrated
    # what a job does with the model: forward passes, or greedy generation of `new_tokens` with a
    # static KV cache of `cache_len` positions (None: the longest prompt and the new tokens)
    mode: Literal["forward", "generate"] = "forward"
    new_tokens: int = DEFAULTS["run-generate"].new_tokens
    cache_len: int | None = None

    @property
    def engines(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([REFERENCE[0], *self.backends]))

    def precisions_of(self, backend: str) -> list[Precision]:
        """The reference backend always runs fp32 too."""
        if backend == REFERENCE[0] and REFERENCE[1] not in self.precisions:
            return [REFERENCE[1], *self.precisions]
        return list(self.precisions)

    def to_dict(self) -> dict[str, Any]:
        return {"backends": list(self.engines), "precisions": [p.value for p in self.precisions], "shapes": [str(s) for s in self.shapes],
                "device": self.device, "warmup": self.warmup, "rounds": self.rounds, "isolation": self.isolation,
                "options": {k: v.to_dict() for k, v in self.options.items()},
                **({"quantization": self.quant.to_dict()} if any(p.quantized for p in self.precisions) else {})}


def check_choices(backends: Sequence[str] | str | None = None, precisions: Sequence[str | Precision] | str = ("fp32",),
                  shapes: Sequence[str | Shape] | str = ("1x128", "8x128"), device: str | None = None,
                  need_backends: bool = False, **kw: Any) -> tuple[list[str], list[Precision], list[Shape]]:
    """Every name and number a job is given, checked without importing torch or any backend (the CLI
    calls it first, so argument errors answer at once): backend names, precisions, shapes, the
    device, warmup, rounds, isolation, timeout, the calibration and the generation settings. An empty list is an
    error; no backends named means all of them, unless `need_backends` (a build names its engines)."""
    names = backends.split(",") if isinstance(backends, str) else list(backends or [])
    names = [n.strip() for n in names if n.strip()]
    if need_backends and not names:
        raise InputError(f"name the engines to build: --backends with one or more of {', '.join(registry.known_names())}")
    for n in names:
        registry.check_name(n)
    names = names or registry.known_names()
    precs = parse_precisions(precisions) if isinstance(precisions, str) else [Precision.parse(p) for p in precisions]
    if not precs:
        raise InputError(f"no precisions given ({precisions!r}): name at least one of {', '.join(p.value for p in Precision)}")
    shps = parse_shapes(shapes) if isinstance(shapes, str) else [s if isinstance(s, Shape) else Shape.parse(s) for s in shapes]
    if not shps:
        raise InputError(f"no shapes given ({shapes!r}): name at least one as BATCHxSEQ, e.g. 1x128,8x128")
    check_device(device)
    for key, least in (("warmup", 0), ("rounds", 1)):
        if key in kw and (not isinstance(kw[key], int) or kw[key] < least):
            raise InputError(f"--{key} {kw[key]!r}: must be an integer >= {least}")
    mode = kw.get("mode", "forward")
    if mode not in ("forward", "generate"):
        raise InputError(f"--mode {mode!r}; valid: forward, generate")
    for key, why in (("new_tokens", "generate at least one token"), ("cache_len", "must be an integer >= 1")):
        if kw.get(key) is not None and (not isinstance(kw[key], int) or kw[key] < 1):
            raise InputError(f"--{key.replace('_', '-')} {kw[key]!r}: {why}")
    if kw.get("cache_len") is not None and mode != "generate":
        raise InputError("--cache-len is for --mode generate")
    if kw.get("isolation", "process") not in ("process", "none"):
        raise InputError(f"--isolation {kw['isolation']!r}; valid: process, none")
    if "timeout_s" in kw and not (isinstance(kw["timeout_s"], (int, float)) and 0 < kw["timeout_s"] < float("inf")):
        raise InputError(f"--timeout {kw['timeout_s']!r}: must be a positive number of seconds")
    if isinstance(kw.get("quant"), Mapping):
        unknown = set(kw["quant"]) - set(QuantSpec.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown quantization setting(s) {', '.join(sorted(unknown))}; valid: {', '.join(QuantSpec.__dataclass_fields__)}")
        QuantSpec(**kw["quant"])
    return list(dict.fromkeys(names)), precs, shps


def make_config(backends: Sequence[str] | str | None = None, precisions: Sequence[str | Precision] | str = ("fp32",),
                shapes: Sequence[str | Shape] | str = ("1x128", "8x128"), device: str | None = None,
                options: Mapping[str, Mapping[str, Any]] | None = None, **kw: Any) -> RunConfig:
    """Turns user input into a RunConfig; unknown names raise an InputError listing the valid ones.
    No backends named means every registered one: those that cannot run here become rows that say why."""
    names, precs, shps = check_choices(backends, precisions, shapes, device, **kw)
    options = dict(options or {})
    for n, values in options.items():  # every option given is checked, also for a backend not in this run
        registry.get(n).options(values)
    if isinstance(kw.get("quant"), Mapping):
        kw["quant"] = QuantSpec(**kw["quant"])
    opts = {n: registry.get(n).options(options.get(n)) for n in dict.fromkeys([REFERENCE[0], *names])}
    return RunConfig(tuple(names), tuple(precs), tuple(shps), device or default_device(), opts, **kw)


def parse_options(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """--option BACKEND.KEY=VALUE pairs as {backend: {key: value}} (each backend types its own values)."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        backend, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise InputError(f"malformed --option {pair!r}: expected BACKEND.KEY=VALUE (kiln backends --options lists them)")
        out.setdefault(backend, {})[name] = value
    return out
