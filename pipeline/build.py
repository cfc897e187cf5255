"""The two jobs that compose the runner with what it leaves behind, for either workload: `run` (a
report, optionally the engines) and `build` (deployable engines under
ROOT/<model>/<backend>-<precision>[-generate]/: cache lookup, runner, acceptance, store)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import backends as registry

from . import manifest, store
from .capture import DEFAULT_CACHE
from .choices import IMAGE_SHAPES, TEXT_SHAPES, defaults
from .config import RunConfig, check_choices, make_config
from .errors import short
from .fsutil import clean_stale, safe_name
from .inputs import Shape
from .models import DEFAULT_MODEL, ModelBundle, load_model
from .precision import Precision
from .report import Report, Result
from .runner import Progress, Runner


def save_engines(runner: Runner, report: Report, root: Path) -> None:
    """Every engine the run built, under root/<backend>-<precision>/; a failed save is noted in its rows."""
    for (name, precision), model in runner.engines.items():
        runner.say(f"saving {name} {precision} engine")
        try:
            files = model.save(root / f"{name}-{precision.value}")
            for r in report.rows(name, precision):
                r.artifact_mb = artifact_mb(files)
        except Exception as e:
            for r in report.rows(name, precision):
                r.reason = (r.reason + "; " if r.reason else "") + f"save failed: {type(e).__name__}: {e}"


def artifact_mb(files: Sequence[Path]) -> float:
    return round(sum(f.stat().st_size for f in files) / 2**20, 2)


def _default_shapes(cfg: RunConfig, bundle: ModelBundle, asked: Any) -> RunConfig:
    """Shapes not given are the model kind's defaults: 1x128,8x128 for text, batches 1 and 8 for images."""
    if asked or not bundle.vision:
        return cfg
    return dataclasses.replace(cfg, shapes=tuple(Shape.parse(s) for s in IMAGE_SHAPES))


def _config(verb: str, shapes: Any, config: dict[str, Any]) -> RunConfig:
    """The job's config: the verb's defaults in the mode (pipeline.choices.DEFAULTS) for what is not given."""
    d = defaults(verb, config.get("mode") or "forward")
    given = {k: v for k, v in config.items() if v is not None}
    return make_config(shapes=TEXT_SHAPES if shapes is None else shapes,
                       **{"warmup": d.warmup, "rounds": d.rounds, "new_tokens": d.new_tokens, **given})


def run(model: str | Path | ModelBundle = DEFAULT_MODEL, *, out: str | Path | None = None, progress: Progress | None = None,
        cache_dir: str | Path | None = None, task: str | None = None, mode: str = "forward", new_tokens: int | None = None,
        cache_len: int | None = None, **config: Any) -> Report:
    """The main job as one call. Returns the Report; writes report.json/.md/.csv under `out` when given.
    `task`: the head to load a model directory with (default: the one its config names); `mode`:
    "forward" or "generate" (greedy generation of `new_tokens` with a static cache of `cache_len`)."""
    shapes = config.pop("shapes", None)
    cfg = _config("run", shapes, {**config, "mode": mode, "new_tokens": new_tokens, "cache_len": cache_len})
    if progress:
        progress(f"loading model {model if not isinstance(model, ModelBundle) else model.name}")
    bundle = model if isinstance(model, ModelBundle) else load_model(model, task)
    cfg = _default_shapes(cfg, bundle, shapes)
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
    size_mb: float | None = None  # the installed engine's files
    # per shape, from the installed engine's manifest: the verdict, the tolerance it was held to, its speed
    shapes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": str(self.path)}


def name_cache(o: BuildOutcome, cache: Path | str | None) -> BuildOutcome:
    """A failing engine may have been built from a cache entry that itself is bad: its reason says
    which cache, and how to build without it."""
    if o.status in ("mismatch", "failed"):
        o.reason += (f" (built with the cache at {cache or DEFAULT_CACHE}: build again without it with --no-cache, "
                     f"or drop it with kiln cache clean)")
    return o


def shipped(outcome: BuildOutcome) -> BuildOutcome:
    """The outcome with what its installed (or reused) engine's manifest says of each shape it was
    checked and timed at: what `kiln build` prints."""
    if outcome.status not in ("built", "reused"):
        return outcome
    meta = manifest.read(outcome.path)
    bench = meta.benchmark
    outcome.size_mb = outcome.size_mb if outcome.size_mb is not None else meta.artifact_mb
    for shape, v in (meta.verdict.shapes if meta.verdict else {}).items():
        if "tolerances" in v:  # a forward engine: its outputs' tolerances, timed against eager fp32
            b = bench.get(shape) or {}
            outcome.shapes[shape] = {"verdict": v.get("verdict"), "atol": max((t["atol"] for t in v["tolerances"].values()), default=None),
                                     "median_ms": b.get("median_ms"), "speedup": b.get("speedup"), "speedup_ci": b.get("speedup_ci")}
        else:  # a generation artifact: greedy tokens against eager fp32's, decoding speed
            outcome.shapes[shape] = {"verdict": "pass", "agreement": v.get("agreement"),
                                     "median_ms": (v.get("decode_ms") or {}).get("median"), "speedup": v.get("decode_speedup")}
    return outcome


def build_table(outcomes: Sequence[BuildOutcome]) -> str:
    """One row per engine and shape: what was installed or reused, its verdict, tolerance and speed
    (the saved engine's, loaded back), and why an engine was not installed."""
    cols = ["backend", "precision", "status", "shape", "verdict", "tolerance", "median ms", "speedup (95% CI)", "MB", "artifact"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    f = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
    for o in outcomes:
        for shape, s in (o.shapes or {"–": {}}).items():
            ci = s.get("speedup_ci")
            speed = "–" if s.get("speedup") is None else f"{s['speedup']:.2f}x" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
            tol = f"atol {s['atol']:.1e}" if s.get("atol") is not None else (f"tokens {s['agreement']:.0%}" if s.get("agreement") is not None else "–")
            lines.append("| " + " | ".join([o.backend, o.precision, o.status, shape, s.get("verdict") or "–", tol, f(s.get("median_ms"), ".2f"),
                                            speed, f(o.size_mb, ".1f"), str(o.path) if o.shapes else "–"]) + " |")
    why = [o for o in outcomes if o.status not in ("built", "reused") and o.reason]
    return "\n".join(lines + ([""] + [f"- {o.backend} {o.precision} {o.status}: {o.reason}" for o in why] if why else [])) + "\n"


def build(model: str | Path | ModelBundle, backends: Sequence[str] | str, precisions: Sequence[str] | str = ("fp32",),
          shapes: Sequence[str] | str | None = None, root: str | Path = "artifacts", device: str | None = None,
          options: Mapping[str, Mapping[str, Any]] | None = None, progress: Progress | None = None,
          cache_dir: str | Path | None = None, warmup: int | None = None, rounds: int | None = None,
          isolation: str = "process", quant: Mapping[str, Any] | None = None, task: str | None = None, mode: str = "forward",
          new_tokens: int | None = None, cache_len: int | None = None) -> list[BuildOutcome]:
    """Engines under root/<model>/<backend>-<precision>[-generate]/, each installed only once its
    saved files, loaded back, passed at every shape; an engine that fails anywhere leaves the
    previous one as it was. Defaults (warmup, rounds, new tokens) are the verb's in the mode."""
    say = progress or (lambda _m: None)
    check_choices(backends, need_backends=True)
    cfg = _config("build", shapes, dict(backends=backends, precisions=precisions, device=device, options=options, warmup=warmup,
                                        rounds=rounds, isolation=isolation, quant=quant, mode=mode, new_tokens=new_tokens,
                                        cache_len=cache_len))
    bundle = model if isinstance(model, ModelBundle) else load_model(model, task)
    cfg = _default_shapes(cfg, bundle, shapes)
    runner = Runner(bundle, cfg, say, Path(cache_dir) if cache_dir else None)
    w, home = runner.workload, Path(root) / safe_name(bundle.name)
    if home.is_dir():
        clean_stale(home, ".staging-")  # left by builds that were killed, also when this one only reuses
    outcomes, todo = [], []
    for b in cfg.backends:
        for p in cfg.precisions:
            target = home / f"{b}-{p.value}{w.suffix}"
            refusal = registry.get(b).refusal(p, cfg.device, generate=w.mode == "generate")
            if refusal:
                outcomes.append(BuildOutcome(b, p.value, target, *refusal))
                continue
            key = w.key(b, p)
            if store.is_current(target, key):
                say(f"{b} {p}: reusing {target} (same graph, options, device and libraries; passed at every shape)")
                outcomes.append(BuildOutcome(b, p.value, target, "reused", f"cache key {key}"))
            else:
                todo.append((b, p, key, target))
    if not todo:
        return [shipped(o) for o in outcomes]
    home.mkdir(parents=True, exist_ok=True)
    clean_stale(home, ".staging-")  # left by builds that were killed; a build still running keeps its own
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=home))
    try:
        report = runner.run(timed=False, backends=[b for b, _, _, _ in todo])
        for b, p, key, target in todo:
            outcomes.append(name_cache(_ship(runner, b, p, key, report.rows(b, p), staging / target.name, target), cache_dir))
    finally:
        runner.close()
        shutil.rmtree(staging, ignore_errors=True)
    return [shipped(o) for o in outcomes]


def _ship(runner: Runner, backend: str, precision: Precision, key: str, rows: list[Result], src: Path, target: Path) -> BuildOutcome:
    """Save the engine, load it back and check and time it at every shape; install it only if all passed."""
    w, say = runner.workload, lambda m: runner.say(f"{backend} {precision}: {m}")
    bad = [r for r in rows if r.status != "ok"]
    engine = runner.engines.get((backend, precision))
    if bad or engine is None:
        worst = bad[0] if bad else rows[0]
        reason = "; ".join(f"at {r.shape}: {r.reason}" for r in bad) or "the engine was not built"
        say(f"{worst.status}, not installed ({reason})")
        return BuildOutcome(backend, precision.value, target, worst.status, reason)
    try:
        size = artifact_mb(engine.save(src))
        say("checking the saved engine, loaded back from its files")
        verdict = w.accept(src, backend, precision)
        if verdict.passed:
            w.seal(src, backend, precision, key, verdict, rows, size)
    except Exception as e:
        say(f"failed: {short(e)}")
        return BuildOutcome(backend, precision.value, target, "failed", short(e))
    if not verdict.passed:
        say(f"mismatch, not installed ({verdict.reason})")
        return BuildOutcome(backend, precision.value, target, "mismatch", f"the saved engine, loaded back: {verdict.reason}")
    store.install(src, target)
    say(f"built {target}")
    return BuildOutcome(backend, precision.value, target, "built", verdict.reason, size)
