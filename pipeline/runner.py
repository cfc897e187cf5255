"""The main job: capture once, compile per backend and precision, compare, benchmark; typed rows out.

The runner prints nothing and saves nothing: progress goes to the callback its caller supplies,
`checkpoint` receives the report so far after each backend (the CLI writes it, so a killed run
loses at most the row in flight), and the engines it built stay on `Runner.engines` for a caller
that saves them until `close()`. Every backend but the reference runs in a worker process of its
own (`isolation="process"`), so a native crash, abort, OOM or hang costs that backend's row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

import backends as registry

from . import contention, progress
from .bench import MemoryWatch, Timing, benchmark, speedup, time_call
from .capture import Captured, capture
from .config import REFERENCE, RunConfig
from .env import environment
from .errors import KilnError
from .inputs import Shape, check_shape
from .models import ModelBundle
from .precision import Precision
from .references import References, check_memory
from .report import Report, Result
from .worker import CompileRequest, RemoteEngine, WorkerCrashed, isolated

Progress = Callable[[str], None]
log = logging.getLogger("kiln")


class Engine(Protocol):
    """What the runner needs of an engine, in this process (CompiledModel) or in a worker (RemoteEngine)."""

    backend: str
    device: str
    build_s: float

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def synchronize(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def notes(self) -> list[str]: ...
    def save(self, directory: str | Path) -> list[Path]: ...


Engines = dict[tuple[str, Precision], Engine]


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400] if not isinstance(e, KilnError) else str(e)[:800]


class Runner:
    def __init__(self, bundle: ModelBundle, config: RunConfig, progress: Progress | None = None,
                 cache_dir: Path | None = None, checkpoint: Callable[[Report], None] | None = None) -> None:
        self.bundle, self.cfg = bundle, config
        self.say = progress or (lambda _msg: None)
        self.cache_dir, self.checkpoint = cache_dir, checkpoint
        self.engines: Engines = {}
        self.references: References | None = None
        self._reference_engines: Engines = {}  # the int8 references, compiled for References and reused for their rows
        self.contention: dict[str, Any] = {"load_before": contention.load_average(), "shapes": [], "noisy": None}
        for s in config.shapes:
            check_shape(bundle, s)
        check_memory(bundle, config.shapes, config.precisions)

    def run(self, captured: Captured | None = None, timed: bool = True) -> Report:
        """The whole job; `captured` skips the capture when the caller already has it; `timed=False`
        skips the benchmark (a build times the engines it loads back instead)."""
        cfg = self.cfg
        if captured is None:
            self.say(f"capturing {self.bundle.name} with torch.export (batch and seq dynamic)")
            with progress.ticking(self.say, "capturing with torch.export"):
                captured = capture(self.bundle, self.cache_dir, cfg.quant)
            self.say(f"captured graph {captured.graph_hash} in {captured.capture_s:.1f}s")
        for s in cfg.shapes:  # capture may have narrowed the model's ranges (its notes say why)
            check_shape(self.bundle, s)
        captured = dataclasses.replace(captured, quant=cfg.quant)
        if any(p.quantized for p in cfg.precisions):
            self.say(f"int8: calibration {cfg.quant.method}, {cfg.quant.samples} samples, weights "
                     f"{'per channel' if cfg.quant.per_channel else 'per tensor'}")

        def quantized_reference(p: Precision) -> Engine:
            engine = registry.get(REFERENCE[0]).compile(captured, p, "cpu", cfg.options[REFERENCE[0]], cfg.shapes)
            if cfg.device == "cpu":
                self._reference_engines[(REFERENCE[0], p)] = engine
            return engine

        self.references = refs = References.compute(self.bundle, cfg.shapes, cfg.precisions, self.say, quantized_reference)
        rows: dict[tuple[str, Precision], dict[Shape, Result]] = {}
        for name in cfg.engines:
            for p in cfg.precisions_of(name):
                rows[(name, p)] = self._build(captured, name, p, refs)
                if self.checkpoint:
                    self.checkpoint(self._report(captured, rows))
        if timed:
            self._benchmark(rows, refs)
        return self._report(captured, rows)

    def _report(self, captured: Captured, rows: dict[tuple[str, Precision], dict[Shape, Result]]) -> Report:
        timed = {"contention": self.contention} if self.contention["shapes"] else {}
        return Report(model={**self.bundle.describe(), "graph_hash": captured.graph_hash, "capture_s": captured.capture_s},
                      environment={**environment(self.cfg.device, registry.libraries()), **timed}, config=self.cfg.to_dict(),
                      results=[r for by_shape in rows.values() for r in by_shape.values()],
                      created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def _worker_pids(self) -> list[int]:
        return [e.worker.process.pid for e in self.engines.values() if isinstance(e, RemoteEngine)]

    def close(self) -> None:
        """Ends the worker processes that hold engines."""
        for engine in self.engines.values():
            if isinstance(engine, RemoteEngine):
                engine.close()

    def _rows(self, name: str, precision: Precision, status: str, reason: str, crashed: bool = False) -> dict[Shape, Result]:
        return {s: Result(name, precision, s, status, reason, crashed=crashed) for s in self.cfg.shapes}

    def isolated(self, name: str) -> tuple[str, str] | None:
        return isolated(self.cfg.isolation, self.bundle.spec, name, REFERENCE[0])

    def _compile_and_check(self, captured: Captured, name: str, precision: Precision,
                           refs: References) -> tuple[Engine, dict[Shape, Result], dict[str, Any]]:
        """The engine, in a worker or here; its row at every shape; and what it says of itself
        (describe, notes) and of its peak memory."""
        cfg, cls_path = self.cfg, self.isolated(name)
        say = lambda message: self.say(f"{name} {precision}: {message}")  # noqa: E731
        if cls_path is None:
            with MemoryWatch(cfg.device) as watch, progress.to(say), progress.ticking(say, "compiling and checking"):
                model = self._reference_engines.pop((name, precision), None) or \
                    registry.get(name).compile(captured, precision, cfg.device, cfg.options[name], cfg.shapes)
                results = {s: self._check(model, s, refs, precision) for s in cfg.shapes}
            return model, results, {"describe": model.describe(), "notes": model.notes(), "peak_host_mb": watch.peak_host_mb,
                           "peak_device_mb": watch.peak_device_mb}
        assert self.bundle.spec is not None  # isolated() runs nothing in a worker without one
        request = CompileRequest(self.bundle.spec, self.bundle.load_task, str(captured.cache_dir), captured.graph_hash, captured.quant,
                                 name, cls_path, precision, cfg.device, cfg.options[name].to_dict(), tuple(cfg.shapes))
        remote = RemoteEngine.compile(f"{name} {precision}", cfg.timeout_s, request, on_progress=say)
        try:
            return remote, {s: self._check(remote, s, refs, precision) for s in cfg.shapes}, remote.info()
        except BaseException:
            remote.close()
            raise

    def _build(self, captured: Captured, name: str, precision: Precision, refs: References) -> dict[Shape, Result]:
        cfg, backend = self.cfg, registry.get(name)
        refusal = backend.refusal(precision, cfg.device)
        if refusal:
            if refusal[0] == "unavailable":
                self.say(f"{name}: unavailable: {refusal[1]}")
            return self._rows(name, precision, *refusal)
        self.say(f"{name} {precision}: compiling" + (" in a worker process" if self.isolated(name) else ""))
        try:
            model, results, info = self._compile_and_check(captured, name, precision, refs)
        except Exception as e:  # a compiler may raise anything; it becomes a row, the run goes on
            self.say(f"{name} {precision}: failed: {_short(e)}")
            log.debug("%s %s failed", name, precision, exc_info=True)
            return self._rows(name, precision, "failed", _short(e), crashed=isinstance(e, WorkerCrashed))
        self.engines[(name, precision)] = model
        for r in results.values():
            r.peak_host_mb, r.peak_device_mb = info.get("peak_host_mb"), info.get("peak_device_mb")
            r.describe = {**r.describe, **info["describe"]}
            r.engine = str(info["describe"].get("engine", ""))
            if info["notes"]:
                r.reason = "; ".join([r.reason, *info["notes"]] if r.reason else info["notes"])
        for r in results.values():  # how the model was loaded or captured, said in each of its rows
            r.reason = "; ".join([x for x in (r.reason, *self.bundle.notes) if x])
        return results

    def _check(self, model: Engine, shape: Shape, refs: References, precision: Precision) -> Result:
        first = {k: v.to(self.cfg.device) for k, v in refs.batches[shape][0].items()}
        cold = time_call(model, first)  # first call at this shape: lazy compilers compile here
        c = refs.judge(model, [shape], precision, self.cfg.tolerances)
        worst = c.worst
        agree = next((o for o in c.outputs if o.agreement is not None), None)
        emb = [o.embedding_cosine for o in c.outputs if o.embedding_cosine is not None]
        return Result(model.backend, precision, shape, "ok" if c.passed else "mismatch",
                      reason="" if c.passed else c.reason, verdict="pass" if c.passed else "fail",
                      max_abs=worst.max_abs if worst else None, cosine=min(o.cosine for o in c.outputs),
                      agreement=agree.agreement if agree else None, agreement_kind=agree.agreement_kind if agree else None,
                      embedding_cosine=min(emb) if emb else None,
                      compile_s=model.build_s + cold / 1e3, comparison=c)

    def _benchmark(self, rows: dict[tuple[str, Precision], dict[Shape, Result]], refs: References) -> None:
        cfg = self.cfg
        for s in cfg.shapes:
            live = [k for k in self.engines if rows[k][s].status in ("ok", "mismatch")]
            if not live:
                continue
            self.say(f"benchmark {s}: {len(live)} engines, {cfg.warmup} warm-up + {cfg.rounds} interleaved rounds")
            inputs = {k: v.to(cfg.device) for k, v in refs.batches[s][0].items()}
            failures: dict[tuple[str, Precision], BaseException] = {}
            def rounds_done(message: str, shape: Shape = s) -> None:
                self.say(f"benchmark {shape}: {message}")

            watch = contention.Watch(self._worker_pids).start()
            timings = benchmark({k: (self.engines[k], inputs) for k in live}, warmup=cfg.warmup, rounds=cfg.rounds,
                                failures=failures, progress=rounds_done)
            ref_samples = timings[REFERENCE].samples_ms if REFERENCE in timings else []
            reading = contention.judge(str(s), watch.stop(), ref_samples,
                                       {f"{k[0]} {k[1]}": t.samples_ms for k, t in timings.items() if k != REFERENCE})
            self.contention["shapes"].append(reading)
            self.contention["noisy"] = contention.verdict(self.contention["shapes"])
            self.contention["load_after"] = contention.load_average()
            if reading["noisy"]:
                self.say(f"benchmark {s}: the machine was busy, speed not judged ({reading['noisy']})")
            for k, e in failures.items():  # that engine's row only; the others keep their timings
                row = rows[k][s]
                row.status, row.reason, row.crashed = "failed", f"benchmark: {_short(e)}", isinstance(e, WorkerCrashed)
            ref: Timing | None = timings.get(REFERENCE)
            for k, t in timings.items():
                rows[k][s].latency_ms = t
                if ref is not None:
                    rows[k][s].speedup = speedup(ref, t)
