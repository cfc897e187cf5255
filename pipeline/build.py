"""The two jobs that compose the runner with what it leaves behind: `run` (a report, optionally the
engines) and `build` (deployable engines under ROOT/<model>/<backend>-<precision>/: cache lookup,
runner, store)."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import store
from .capture import Captured, capture
from .config import RunConfig, make_config
from .env import device_info, environment
from .errors import InputError
from .fsutil import digest, safe_name
from .models import DEFAULT_MODEL, ModelBundle, load_model
from .precision import Precision
from .references import output_axes
from .report import Report, Result
from .runner import Progress, Runner


def save_engines(runner: Runner, report: Report, root: Path) -> None:
    """Every engine the run built, under root/<backend>-<precision>/; a failed save is noted in its rows."""
    for (name, precision), model in runner.engines.items():
        runner.say(f"saving {name} {precision} engine")
        try:
            model.save(root / f"{name}-{precision.value}")
        except Exception as e:
            for r in report.rows(name, precision):
                r.reason = (r.reason + "; " if r.reason else "") + f"save failed: {type(e).__name__}: {e}"


def run(model: str | Path | ModelBundle = DEFAULT_MODEL, *, out: str | Path | None = None, progress: Progress | None = None,
        cache_dir: str | Path | None = None, **config: Any) -> Report:
    """The main job as one call. Returns the Report; writes report.json/.md/.csv under `out` when given."""
    cfg = make_config(**config)
    if progress:
        progress(f"loading model {model if not isinstance(model, ModelBundle) else model.name}")
    bundle = model if isinstance(model, ModelBundle) else load_model(model)
    checkpoint = (lambda partial: partial.save(out)) if out is not None else None  # a killed run keeps its rows
    runner = Runner(bundle, cfg, progress, Path(cache_dir) if cache_dir else None, checkpoint)
    try:
        report = runner.run()
        if cfg.save_engines:
            save_engines(runner, report, cfg.save_engines)
    finally:
        runner.close()
    if out is not None:
        report.save(out)
    return report


@dataclass
class BuildOutcome:
    backend: str
    precision: str
    path: Path
    status: str  # built | reused | failed | unavailable | unsupported | mismatch
    reason: str = ""


def cache_key(captured: Captured, cfg: RunConfig, backend: str, precision: Precision) -> str:
    """Everything that changes the engine: graph, backend, precision, build options, device, libraries, shapes."""
    import backends as registry

    return digest({"graph": captured.graph_hash, "backend": backend, "precision": precision.value,
                   "options": cfg.options[backend].build_options(), "device": device_info(cfg.device),
                   "requires": registry.get(backend).pinned(), "shapes": [str(s) for s in cfg.shapes]}, 20)


def build(model: str | Path | ModelBundle, backends: Sequence[str] | str, precisions: Sequence[str] | str = ("fp32",),
          shapes: Sequence[str] | str = ("1x128", "8x128"), root: str | Path = "artifacts", device: str | None = None,
          options: Mapping[str, Mapping[str, Any]] | None = None, progress: Progress | None = None,
          cache_dir: str | Path | None = None, warmup: int = 3, rounds: int = 10) -> list[BuildOutcome]:
    say = progress or (lambda _m: None)
    if not [b for b in (backends.split(",") if isinstance(backends, str) else backends) if b.strip()]:
        import backends as registry

        raise InputError(f"name the engines to build: --backends with one or more of {', '.join(registry.names())}")
    cfg = make_config(backends=backends, precisions=precisions, shapes=shapes, device=device, options=options,
                      warmup=warmup, rounds=rounds)
    bundle = model if isinstance(model, ModelBundle) else load_model(model)
    say(f"capturing {bundle.name}")
    captured = capture(bundle, cache_dir)
    home = Path(root) / safe_name(bundle.name)
    outcomes, todo = [], []
    for b in cfg.backends:
        for p in cfg.precisions:
            key, target = cache_key(captured, cfg, b, p), home / f"{b}-{p.value}"
            if store.is_current(target, key):
                say(f"{b} {p}: reusing {target} (same graph, options, device and libraries)")
                outcomes.append(BuildOutcome(b, p.value, target, "reused", f"cache key {key}"))
            else:
                todo.append((b, p, key))
    if not todo:
        return outcomes
    home.mkdir(parents=True, exist_ok=True)
    for stale in home.glob(".staging-*"):  # an earlier build that was interrupted
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=home))
    try:
        runner = Runner(bundle, dataclasses.replace(cfg, backends=tuple(dict.fromkeys(b for b, _, _ in todo))), say,
                        Path(cache_dir) if cache_dir else None)
        report = runner.run(captured)
        assert runner.references is not None
        shared = _model_sections(bundle, captured, cfg)
        axes, saved = output_axes(bundle), runner.references.saved(min(cfg.shapes, key=lambda s: s.batch * s.seq))
        for b, p, key in todo:
            rows = report.rows(b, p)
            sections = {**shared, **_measured(rows, cfg, b, key, axes)}
            outcomes.append(_stage_and_install(runner, rows, sections, saved, b, p, staging, home, say))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return outcomes


def _stage_and_install(runner: Runner, rows: list[Result], sections: dict[str, Any], saved: tuple[list[Any], list[Any]],
                       backend: str, precision: Precision, staging: Path, home: Path, say: Progress) -> BuildOutcome:
    """Save the engine into staging with its reference batches and measurements, then install it whole."""
    src, target = staging / f"{backend}-{precision.value}", home / f"{backend}-{precision.value}"
    first, engine = rows[0], runner.engines.get((backend, precision))
    if engine is None or first.status not in ("ok", "mismatch"):
        return BuildOutcome(backend, precision.value, target, first.status, first.reason or "the engine was not built")
    try:
        engine.save(src)
    except Exception as e:
        return BuildOutcome(backend, precision.value, target, "failed", f"save failed: {type(e).__name__}: {e}")
    store.write_reference(src, *saved)
    store.seal(src, sections)
    store.install(src, target)
    status = "built" if first.status == "ok" else "mismatch"
    say(f"{backend} {precision}: {status} {target}")
    return BuildOutcome(backend, precision.value, target, status, first.reason)


def _model_sections(bundle: ModelBundle, captured: Captured, cfg: RunConfig) -> dict[str, Any]:
    """What every engine of this build shares: the model and its inputs."""
    return {
        "model": {"name": bundle.name, "graph_hash": captured.graph_hash, "task": bundle.task, "source": bundle.source},
        "inputs": {n: {"dtype": str(s.dtype).removeprefix("torch."), "dims": list(s.dims), "high": s.high}
                   for n, s in bundle.inputs.items()},
        "axis_ranges": {k: list(v) for k, v in bundle.axis_ranges.items()},
        "versions": environment(cfg.device)["versions"],
    }


def _measured(rows: list[Result], cfg: RunConfig, backend: str, key: str, axes: dict[str, list[int | str]]) -> dict[str, Any]:
    """This engine's outputs as it returns them, its build options, and what its build measured."""
    first = rows[0]
    outputs = first.comparison.outputs if first.comparison else []
    return {
        "outputs": {o.name: {"dims": axes[o.name], "dtype": o.dtype} for o in outputs},
        "build_options": cfg.options[backend].build_options(), "cache_key": key,
        "verdict": {"status": first.status, "verdict": first.verdict, "reason": first.reason,
                    "max_abs": max((r.max_abs or 0.0) for r in rows), "tolerances": {o.name: o.applied.to_dict() for o in outputs}},
        "benchmark": {str(r.shape): {"median_ms": r.latency_ms.median if r.latency_ms else None,
                                     "speedup": r.speedup.value if r.speedup else None} for r in rows},
        "describe": first.describe,
    }
