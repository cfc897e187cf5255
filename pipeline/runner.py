"""The main job: capture once, compile per backend and precision, compare, benchmark, report."""

from __future__ import annotations

import copy
import datetime as dt
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import backends as registry
from backends.base import BackendOptions, CompiledModel

from .bench import MemoryWatch, Timing, benchmark, environment, speedup, time_call
from .capture import Captured, capture
from .compare import Comparator
from .errors import KilnError, NumericsError
from .inputs import Shape, check_shape, make_inputs, parse_shapes
from .models import DEFAULT_MODEL, ModelBundle, load_model
from .precision import Precision, Tolerance, parse_precisions
from .report import Report, Result

Progress = Callable[[str], None]
REFERENCE = ("eager", Precision.FP32)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _stderr_progress() -> Progress:
    t0 = time.perf_counter()
    return lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def _run_no_grad(model: Any, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tuple(model(**inputs))


@dataclass
class RunConfig:
    """Everything a run needs; validated before any work starts."""

    backends: list[str]
    precisions: list[Precision]
    shapes: list[Shape]
    device: str
    options: dict[str, BackendOptions]
    warmup: int = 5
    rounds: int = 20
    tolerances: Tolerance | Mapping[str, Tolerance] | None = None
    save_engines: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"backends": self.backends, "precisions": [p.value for p in self.precisions], "shapes": [str(s) for s in self.shapes],
                "device": self.device, "warmup": self.warmup, "rounds": self.rounds,
                "options": {k: v.to_dict() for k, v in self.options.items()}}


def make_config(backends: Sequence[str] | str | None = None, precisions: Sequence[str | Precision] | str = ("fp32",),
                shapes: Sequence[str | Shape] | str = ("1x128", "8x128"), device: str | None = None,
                options: Mapping[str, Mapping[str, Any]] | None = None, **kw: Any) -> RunConfig:
    """Turns user input into a RunConfig; unknown names raise an InputError listing the valid ones."""
    names = backends.split(",") if isinstance(backends, str) else list(backends or [])
    names = [n.strip() for n in names if n.strip()]
    device = device or default_device()
    if not names:  # every registered backend: the unavailable ones are rows that say why
        names = registry.names()
    for n in names:
        registry.get(n)
    if "eager" not in names:  # the reference every speedup is measured against
        names.insert(0, "eager")
    precs = parse_precisions(precisions) if isinstance(precisions, str) else [Precision.parse(p) for p in precisions]
    shps = parse_shapes(shapes) if isinstance(shapes, str) else [s if isinstance(s, Shape) else Shape.parse(s) for s in shapes]
    options = dict(options or {})
    for n in options:
        registry.get(n)
    opts = {n: registry.get(n).options(options.get(n)) for n in names}
    return RunConfig(list(dict.fromkeys(names)), precs or [Precision.FP32], shps, device, opts, **kw)


@dataclass
class _Row:
    backend: str
    precision: Precision
    model: CompiledModel | None = None
    results: dict[Shape, Result] = field(default_factory=dict)


class Runner:
    def __init__(self, bundle: ModelBundle, config: RunConfig, progress: Progress | None = None,
                 cache_dir: Path | None = None) -> None:
        self.bundle, self.cfg = bundle, config
        self.say = progress or (lambda _msg: None)
        self.cache_dir = cache_dir
        for s in config.shapes:
            check_shape(bundle, s)

    def run(self, captured: Captured | None = None) -> Report:
        """The whole job; `captured` skips the capture when the caller already has it."""
        cfg = self.cfg
        if captured is None:
            self.say(f"capturing {self.bundle.name} with torch.export (batch and seq dynamic)")
            captured = capture(self.bundle, self.cache_dir)
            self.say(f"captured graph {captured.graph_hash} in {captured.capture_s:.1f}s")
        batches = {s: [make_inputs(self.bundle, s, kind, seed=i) for i, kind in enumerate(("text", "random", "padded"))]
                   for s in cfg.shapes}
        refs = self._references(batches)
        rows: list[_Row] = []
        for name in cfg.backends:
            for p in cfg.precisions if name != "eager" or Precision.FP32 in cfg.precisions else [Precision.FP32, *cfg.precisions]:
                rows.append(self._build(captured, name, p, batches, refs))
        self._benchmark(rows, batches)
        if cfg.save_engines:
            self._save(rows, cfg.save_engines)
        results = [r for row in rows for r in row.results.values()]
        return Report(model={**self.bundle.describe(), "graph_hash": captured.graph_hash, "capture_s": captured.capture_s},
                      environment=environment(cfg.device), config=cfg.to_dict(), results=results,
                      created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def _references(self, batches: dict[Shape, list[dict[str, torch.Tensor]]]) -> dict[str, Any]:
        """Eager fp32 (the reference), fp64 (the shadow truth), and eager at each precision (what it costs)."""
        self.say("reference outputs: eager fp32, fp64 shadow" + "".join(f", eager {p}" for p in self.cfg.precisions if p != Precision.FP32))
        mods: dict[str, torch.nn.Module] = {"fp32": self.bundle.module, "fp64": copy.deepcopy(self.bundle.module).double()}
        for p in self.cfg.precisions:
            if p != Precision.FP32:
                mods[p.value] = copy.deepcopy(self.bundle.module).to(p.dtype)
        refs: dict[str, Any] = {}
        for key, mod in mods.items():
            refs[key] = {}
            for s, bs in batches.items():
                outs = []
                for b in bs:
                    o = dict(zip(self.bundle.output_names, _run_no_grad(mod, b)))
                    if key in ("fp32", "fp64") and not all(torch.isfinite(t).all() for t in o.values()):
                        raise NumericsError(f"eager {key} itself gives NaN or Inf on {self.bundle.name} at {s}: the model or inputs are broken")
                    outs.append(o)
                refs[key][s] = outs
        return refs

    def _rows_for(self, name: str, precision: Precision, status: str, reason: str) -> _Row:
        row = _Row(name, precision)
        row.results = {s: Result(name, precision.value, str(s), status, reason) for s in self.cfg.shapes}
        return row

    def _build(self, captured: Captured, name: str, precision: Precision, batches: dict[Shape, list[dict[str, torch.Tensor]]],
               refs: dict[str, Any]) -> _Row:
        cfg, backend = self.cfg, registry.get(name)
        avail = backend.availability(cfg.device)
        if not avail:
            self.say(f"{name}: unavailable: {avail.reason}")
            return self._rows_for(name, precision, "unavailable", avail.reason)
        sup = backend.supports(precision, cfg.device)
        if not sup:
            return self._rows_for(name, precision, "unsupported", sup.reason)
        self.say(f"{name} {precision}: compiling")
        row = _Row(name, precision)
        try:
            with MemoryWatch(cfg.device) as mem:
                row.model = backend.compile(captured, precision, cfg.device, cfg.options[name], cfg.shapes)
                for s in cfg.shapes:
                    row.results[s] = self._check(row.model, s, batches[s], refs, precision)
        except KilnError as e:
            self.say(f"{name} {precision}: failed: {e}")
            return self._rows_for(name, precision, "failed", str(e))
        except Exception as e:  # a compiler may raise anything; it becomes a row, the run goes on
            self.say(f"{name} {precision}: failed: {_short(e)}")
            if "KILN_DEBUG" in __import__("os").environ:
                traceback.print_exc()
            return self._rows_for(name, precision, "failed", _short(e))
        for r in row.results.values():
            r.peak_host_mb, r.peak_device_mb = mem.peak_host_mb, mem.peak_device_mb
            r.describe = {**r.describe, **row.model.describe()}
            # What a backend wants every reader to see (an untuned build, static shapes) goes into the row.
            notes = [str(r.describe[k]) for k in ("warning", "note") if r.describe.get(k)]
            if notes:
                r.reason = "; ".join([r.reason, *notes] if r.reason else notes)
        return row

    def _check(self, model: CompiledModel, shape: Shape, batches: list[dict[str, torch.Tensor]], refs: dict[str, Any],
               precision: Precision) -> Result:
        dev = self.cfg.device
        on_dev = [{k: v.to(dev) for k, v in b.items()} for b in batches]
        cold = time_call(model, on_dev[0])  # first call at this shape: lazy compilers compile here
        comp = Comparator(precision, self.bundle.task, self.cfg.tolerances)
        dtypes: dict[str, str] = {}
        for i, b in enumerate(on_dev):
            out = model(b)
            dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in out.items()}
            comp.add(out, refs["fp32"][shape][i], refs["fp64"][shape][i], refs[precision.value][shape][i],
                     batches[i].get("attention_mask"))
        c = comp.result()
        worst = c.worst
        agree = next((o for o in c.outputs if o.agreement is not None), None)
        return Result(model.backend, precision.value, str(shape), "ok" if c.passed else "mismatch",
                      reason="" if c.passed else c.reason, verdict="pass" if c.passed else "fail",
                      max_abs=worst.max_abs if worst else None, cosine=min(o.cosine for o in c.outputs),
                      agreement=agree.agreement if agree else None, agreement_kind=agree.agreement_kind if agree else None,
                      compile_s=model.build_s + cold / 1e3, comparison=c.to_dict(), describe={"output_dtypes": dtypes})

    def _benchmark(self, rows: list[_Row], batches: dict[Shape, list[dict[str, torch.Tensor]]]) -> None:
        cfg = self.cfg
        for s in cfg.shapes:
            live = [r for r in rows if r.model is not None and r.results[s].status in ("ok", "mismatch")]
            if not live:
                continue
            self.say(f"benchmark {s}: {len(live)} engines, {cfg.warmup} warm-up + {cfg.rounds} interleaved rounds")
            inputs = {k: v.to(cfg.device) for k, v in batches[s][0].items()}
            entries = {(r.backend, r.precision): (r.model, inputs) for r in live if r.model is not None}
            try:
                timings = benchmark(entries, warmup=cfg.warmup, rounds=cfg.rounds)
            except Exception as e:
                for r in live:
                    r.results[s].status, r.results[s].reason = "failed", f"benchmark: {_short(e)}"
                continue
            ref: Timing | None = timings.get(REFERENCE)
            for r in live:
                res, t = r.results[s], timings[(r.backend, r.precision)]
                res.latency_ms = t.to_dict()
                if ref is not None:
                    res.speedup = speedup(ref, t).to_dict()

    def _save(self, rows: list[_Row], root: Path) -> None:
        for r in rows:
            if r.model is None:
                continue
            self.say(f"saving {r.backend} {r.precision} engine")
            try:
                r.model.save(root / f"{r.backend}-{r.precision.value}")
            except Exception as e:
                for res in r.results.values():
                    res.reason = (res.reason + "; " if res.reason else "") + f"save failed: {_short(e)}"


def run(model: str | Path | ModelBundle = DEFAULT_MODEL, *, out: str | Path | None = None, progress: Progress | None = None,
        cache_dir: str | Path | None = None, **config: Any) -> Report:
    """The main job as one call. Returns the Report; writes report.json/.md/.csv under `out` when given."""
    cfg = make_config(**config)
    bundle = model if isinstance(model, ModelBundle) else load_model(model)
    report = Runner(bundle, cfg, progress, Path(cache_dir) if cache_dir else None).run()
    if out is not None:
        report.save(out)
    return report
