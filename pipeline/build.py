"""The two jobs that compose the runner with what it leaves behind: `run` (a report, optionally the
engines) and `build` (deployable engines under ROOT/<model>/<backend>-<precision>/: cache lookup,
runner, store)."""

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
from .acceptance import accept
from .capture import DEFAULT_CACHE, Captured, capture
from .choices import DEFAULTS, IMAGE_SHAPES, TEXT_SHAPES
from .config import REFERENCE, RunConfig, check_choices, make_config
from .env import device_info, environment
from .errors import ArtifactError, InputError
from .inputs import Shape
from .manifest import ModelRecord
from .fsutil import clean_stale, digest, safe_name
from .models import DEFAULT_MODEL, ModelBundle, load_model
from .precision import Precision
from .references import KINDS, output_axes
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


def run(model: str | Path | ModelBundle = DEFAULT_MODEL, *, out: str | Path | None = None, progress: Progress | None = None,
        cache_dir: str | Path | None = None, task: str | None = None, **config: Any) -> Report:
    """The main job as one call. Returns the Report; writes report.json/.md/.csv under `out` when given.
    `task`: the head to load a model directory with (default: the one its config names)."""
    shapes = config.pop("shapes", None)
    cfg = make_config(shapes=TEXT_SHAPES if shapes is None else shapes, **config)
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


def name_cache(outcomes: list[BuildOutcome], cache: Path | str | None) -> list[BuildOutcome]:
    """A failing engine may have been built from a cache entry that itself is bad: its reason says
    which cache, and how to build without it."""
    for o in outcomes:
        if o.status in ("mismatch", "failed"):
            o.reason += (f" (built with the cache at {cache or DEFAULT_CACHE}: build again without it with --no-cache, "
                         f"or drop it with kiln cache clean)")
    return outcomes


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


def cache_key(captured: Captured, cfg: RunConfig, backend: str, precision: Precision) -> str:
    """Everything that changes the engine: graph, backend, precision, build options, device, libraries, shapes."""
    return digest({"graph": captured.graph_hash, "backend": backend, "precision": precision.value,
                   "options": cfg.options[backend].build_options(), "device": device_info(cfg.device),
                   "requires": registry.get(backend).pinned(), "shapes": [str(s) for s in cfg.shapes],
                   **({"quantization": cfg.quant.to_dict()} if precision.quantized else {})}, 20)


def build(model: str | Path | ModelBundle, backends: Sequence[str] | str, precisions: Sequence[str] | str = ("fp32",),
          shapes: Sequence[str] | str | None = None, root: str | Path = "artifacts", device: str | None = None,
          options: Mapping[str, Mapping[str, Any]] | None = None, progress: Progress | None = None,
          cache_dir: str | Path | None = None, warmup: int = DEFAULTS["build"].warmup, rounds: int = DEFAULTS["build"].rounds,
          isolation: str = "process", quant: Mapping[str, Any] | None = None, task: str | None = None) -> list[BuildOutcome]:
    """Engines under root/<model>/<backend>-<precision>/, each installed only once its saved files,
    loaded back, passed at every shape; an engine that fails anywhere leaves the previous one as it was."""
    say = progress or (lambda _m: None)
    check_choices(backends, need_backends=True)
    cfg = make_config(backends=backends, precisions=precisions, shapes=TEXT_SHAPES if shapes is None else shapes, device=device,
                      options=options, warmup=warmup, rounds=rounds, isolation=isolation, **({"quant": quant} if quant else {}))
    bundle = model if isinstance(model, ModelBundle) else load_model(model, task)
    cfg = _default_shapes(cfg, bundle, shapes)
    say(f"capturing {bundle.name}")
    captured = capture(bundle, cache_dir, cfg.quant)
    home = Path(root) / safe_name(bundle.name)
    if home.is_dir():
        clean_stale(home, ".staging-")  # left by builds that were killed, also when this one only reuses
    outcomes, todo = [], []
    for b in cfg.backends:
        for p in cfg.precisions:
            key, target = cache_key(captured, cfg, b, p), home / f"{b}-{p.value}"
            if store.is_current(target, key):
                say(f"{b} {p}: reusing {target} (same graph, options, device and libraries; passed at every shape)")
                outcomes.append(BuildOutcome(b, p.value, target, "reused", f"cache key {key}"))
            else:
                todo.append((b, p, key))
    if not todo:
        return [shipped(o) for o in outcomes]
    home.mkdir(parents=True, exist_ok=True)
    clean_stale(home, ".staging-")  # left by builds that were killed; a build still running keeps its own
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=home))
    runner = Runner(bundle, dataclasses.replace(cfg, backends=tuple(dict.fromkeys(b for b, _, _ in todo))), say,
                    Path(cache_dir) if cache_dir else None)
    try:
        report = runner.run(captured, timed=False)
        job = _Job(runner, cfg, _model_sections(bundle, captured, cfg), output_axes(bundle), staging, home, say)
        outcomes += name_cache([job.ship(b, p, key, report.rows(b, p)) for b, p, key in todo], captured.cache_dir)
    finally:
        runner.close()
        shutil.rmtree(staging, ignore_errors=True)
    return [shipped(o) for o in outcomes]


@dataclass
class _Job:
    runner: Runner
    cfg: RunConfig
    shared: dict[str, Any]
    axes: dict[str, list[int | str]]
    staging: Path
    home: Path
    say: Progress

    def ship(self, backend: str, precision: Precision, key: str, rows: list[Result]) -> BuildOutcome:
        """Save the engine, load it back and check and time it at every shape; install it only if all passed."""
        target = self.home / f"{backend}-{precision.value}"
        bad = [r for r in rows if r.status != "ok"]
        engine = self.runner.engines.get((backend, precision))
        if bad or engine is None:
            worst = bad[0] if bad else rows[0]
            reason = "; ".join(f"at {r.shape}: {r.reason}" for r in bad) or "the engine was not built"
            self.say(f"{backend} {precision}: {worst.status}, not installed ({reason})")
            return BuildOutcome(backend, precision.value, target, worst.status, reason)
        src = self.staging / f"{backend}-{precision.value}"
        refs = self.runner.references
        reference = self.runner.engines.get(REFERENCE)
        assert refs is not None and reference is not None
        try:
            size = artifact_mb(engine.save(src))
            self.say(f"{backend} {precision}: checking the saved engine, loaded back from its files")
            verdict = accept(src, refs, precision, self.cfg.device, reference, cls_path=self.runner.isolated(backend),
                             isolated=self.cfg.isolation == "process", warmup=self.cfg.warmup, rounds=self.cfg.rounds,
                             tolerances=self.cfg.tolerances, timeout_s=self.cfg.timeout_s, say=self.say)
        except Exception as e:
            self.say(f"{backend} {precision}: failed: {type(e).__name__}: {e}")
            return BuildOutcome(backend, precision.value, target, "failed", f"{type(e).__name__}: {e}")
        if not verdict.passed:
            self.say(f"{backend} {precision}: mismatch, not installed ({verdict.reason})")
            return BuildOutcome(backend, precision.value, target, "mismatch", f"the saved engine, loaded back: {verdict.reason}")
        store.write_reference(src, {str(s): refs.saved(s, KINDS) for s in refs.shapes}, refs.task_batches(KINDS))
        pre = save_preprocessor(self.runner.bundle, src)  # so the artifact can answer text or images (kiln predict)
        manifest.write(src, manifest.read(src).with_sections(
            **self.shared, **verdict.manifest(self.axes), build_options=self.cfg.options[backend].build_options(),
            cache_key=key, describe=rows[0].describe, artifact_mb=size, **pre))
        store.install(src, target)
        self.say(f"{backend} {precision}: built {target}")
        return BuildOutcome(backend, precision.value, target, "built", verdict.reason, size)


def save_preprocessor(bundle: ModelBundle, directory: Path) -> dict[str, Any]:
    """The model's tokenizer (text) or image processor (images) files beside the engine's, hashed
    with them: the manifest's field ("tokenizer" or "processor") and its files; {} without one."""
    key, pre = ("processor", bundle.processor) if bundle.vision else ("tokenizer", bundle.tokenizer)
    if pre is None:
        return {}
    before = {p.name for p in directory.iterdir()}
    pre.save_pretrained(directory)
    added = sorted(p.name for p in directory.iterdir() if p.name not in before)
    for name in added:
        if not (directory / name).is_file():
            raise ArtifactError(f"the {key} wrote {name}, not a file: an engine directory holds files only")
    return {key: tuple(added)}


def _model_sections(bundle: ModelBundle, captured: Captured, cfg: RunConfig) -> dict[str, Any]:
    """What every engine of this build shares: the model, its inputs and its head's labels."""
    return {
        "model": ModelRecord(bundle.name, bundle.task, captured.graph_hash, bundle.source, tuple(bundle.output_names),
                             bundle.summary.get("labels")),
        "inputs": {n: {"dtype": str(s.dtype).removeprefix("torch."), "dims": list(s.dims), "high": s.high}
                   for n, s in bundle.inputs.items()},
        "axis_ranges": {k: list(v) for k, v in bundle.axis_ranges.items()},
        "versions": environment(cfg.device, registry.libraries())["versions"],
    }
