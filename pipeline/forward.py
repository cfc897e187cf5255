"""The forward workload: one captured program, every engine checked against eager on seeded batches
of every input kind and timed in interleaved rounds; a build's engine saved, loaded back in a fresh
worker, judged and timed again before its manifest is sealed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import backends as registry

from . import contention, manifest, progress, store
from .acceptance import Acceptance, accept
from .bench import Noop, Timing, benchmark, speedup, steady_allocator, time_call
from .capture import Captured, capture
from .config import REFERENCE
from .errors import BackendError, short
from .env import device_info
from .fsutil import digest
from .inputs import Shape, check_shape
from .manifest import ModelRecord
from .models import load_model
from .precision import Precision
from .references import KINDS, References, check_memory, output_axes
from .report import Result
from .worker import CompileRequest, RemoteEngine, WorkerCrashed, engine_starts, loads_in_worker

if TYPE_CHECKING:
    from .workload import Context, Engine, Engines, Rows


def compiled(req: CompileRequest) -> Any:
    """A forward engine: the captured program read from the cache by content (checked against the run's hash), compiled."""
    captured = capture(load_model(req.model_spec, req.model_task), Path(req.cache_dir) if req.cache_dir else None, req.quant,
                       longest(req.shapes))
    if captured.graph_hash != req.graph_hash:
        raise BackendError(f"the worker captured graph {captured.graph_hash}, the run {req.graph_hash}: the model loaded differently")
    engine_starts()  # the engine's peak, as the in-process watch counts it: not the model's load
    return registry.resolve(req.backend, req.cls_path).compile(captured, req.precision, req.device, req.options, list(req.shapes))


def longest(shapes: Any) -> int | None:
    return max((s.seq for s in shapes if s.seq), default=None)


def loaded(directory: str, device: str, cls_path: tuple[str, str] | None) -> Any:
    """A saved forward engine, by its backend's own load (hashes and versions checked); no model code is loaded."""
    return registry.resolve(manifest.read(directory).backend, cls_path).load(directory, device)


class Forward:
    mode, suffix = "forward", ""

    def __init__(self, runner: Context) -> None:
        self.r, bundle, cfg = runner, runner.bundle, runner.cfg
        for s in cfg.shapes:
            check_shape(bundle, s)
        check_memory(bundle, cfg.shapes, cfg.precisions)
        self._captured: Captured | None = None
        self.refs: References | None = None
        self._reference_engines: dict[tuple[str, Precision], Engine] = {}  # the int8 references, reused for their rows
        self.contention: dict[str, Any] = {"load_before": contention.load_average(), "shapes": [], "noisy": None}
        self.harness: dict[str, Any] = {}

    @property
    def captured(self) -> Captured:
        """The model's program, captured once (a build's cache keys need it before the run)."""
        if self._captured is None:
            r = self.r
            r.say(f"capturing {r.bundle.name} with torch.export (batch and seq dynamic)")
            with progress.ticking(r.say, "capturing with torch.export"):
                captured = capture(r.bundle, r.cache_dir, r.cfg.quant, longest(r.cfg.shapes))
            r.say(f"captured graph {captured.graph_hash} in {captured.capture_s:.1f}s")
            for s in r.cfg.shapes:  # capture may have narrowed the model's ranges (its notes say why)
                check_shape(r.bundle, s)
            self._captured = dataclasses.replace(captured, quant=r.cfg.quant)
        return self._captured

    def prepare(self) -> None:
        cfg, say, captured = self.r.cfg, self.r.say, self.captured
        if any(p.quantized for p in cfg.precisions):
            say(f"int8: calibration {cfg.quant.method}, {cfg.quant.samples} samples, weights "
                f"{'per channel' if cfg.quant.per_channel else 'per tensor'}")

        def quantized_reference(p: Precision) -> Engine:
            engine = registry.get(REFERENCE[0]).compile(captured, p, "cpu", cfg.options[REFERENCE[0]], cfg.shapes)
            if cfg.device == "cpu":
                self._reference_engines[(REFERENCE[0], p)] = engine
            return engine

        self.refs = References.compute(self.r.bundle, cfg.shapes, cfg.precisions, say, quantized_reference)

    def compile_here(self, name: str, precision: Precision) -> Engine:
        cfg = self.r.cfg
        return self._reference_engines.pop((name, precision), None) or \
            registry.get(name).compile(self.captured, precision, cfg.device, cfg.options[name], cfg.shapes)

    def request(self, name: str, precision: Precision, cls_path: tuple[str, str]) -> tuple[str, tuple[Any, ...]]:
        cfg, bundle, c = self.r.cfg, self.r.bundle, self.captured
        assert bundle.spec is not None  # isolated() runs nothing in a worker without one
        return "pipeline.forward:compiled", (CompileRequest(bundle.spec, bundle.load_task, str(c.cache_dir), c.graph_hash, c.quant, name,
                                                           cls_path, precision, cfg.device, cfg.options[name].to_dict(),
                                                           tuple(cfg.shapes)),)

    def check(self, engine: Engine, name: str, precision: Precision) -> dict[Shape, Result]:
        return {s: self._check(engine, s, precision) for s in self.r.cfg.shapes}

    def _check(self, model: Engine, shape: Shape, precision: Precision) -> Result:
        refs = self.refs
        assert refs is not None
        first = {k: v.to(self.r.cfg.device) for k, v in refs.batches[shape][0].items()}
        cold = time_call(model, first)  # first call at this shape: lazy compilers compile here
        c = refs.judge(model, [shape], precision, self.r.cfg.tolerances)
        worst = c.worst
        agree = next((o for o in c.outputs if o.agreement is not None), None)
        emb = [o.embedding_cosine for o in c.outputs if o.embedding_cosine is not None]
        return Result(model.backend, precision, shape, "ok" if c.passed else "mismatch",
                      reason="" if c.passed else c.reason, verdict="pass" if c.passed else "fail",
                      max_abs=worst.max_abs if worst else None, cosine=min(o.cosine for o in c.outputs),
                      agreement=agree.agreement if agree else None, agreement_kind=agree.agreement_kind if agree else None,
                      embedding_cosine=min(emb) if emb else None,
                      compile_s=model.build_s + cold / 1e3, comparison=c)

    def time(self, engines: Engines, rows: Rows) -> None:
        cfg, say, refs = self.r.cfg, self.r.say, self.refs
        assert refs is not None
        # the harness's own cost, timed in the same rounds: an empty call here and in a worker
        remote = next((e for e in engines.values() if isinstance(e, RemoteEngine)), None)
        probes: dict[Any, Any] = {("no-op", "in process"): Noop(), **({("no-op", "in a worker"): remote.noop()} if remote else {})}
        self.harness = {"allocator": steady_allocator(), "noop_ms": {}}
        for s in cfg.shapes:
            live = [k for k in engines if rows[k][s].status in ("ok", "mismatch")]
            if not live:
                continue
            say(f"benchmark {s}: {len(live)} engines, {cfg.warmup} warm-up + {cfg.rounds} interleaved rounds")
            inputs = {k: v.to(cfg.device) for k, v in refs.batches[s][0].items()}
            failures: dict[tuple[str, Precision], BaseException] = {}

            def rounds_done(message: str, shape: Shape = s) -> None:
                say(f"benchmark {shape}: {message}")

            watch = contention.Watch(self.r.worker_pids).start()
            timings = benchmark({**{k: (engines[k], inputs) for k in live}, **{k: (p, inputs) for k, p in probes.items()}},
                                warmup=cfg.warmup, rounds=cfg.rounds, failures=failures, progress=rounds_done)
            self.harness["noop_ms"][str(s)] = {k[1]: timings.pop(k).median for k in probes if k in timings}
            ref_samples = timings[REFERENCE].samples_ms if REFERENCE in timings else []
            reading = contention.judge(str(s), watch.stop(), ref_samples,
                                       {f"{k[0]} {k[1]}": t.samples_ms for k, t in timings.items() if k != REFERENCE})
            self.contention["shapes"].append(reading)
            self.contention["noisy"] = contention.verdict(self.contention["shapes"])
            self.contention["load_after"] = contention.load_average()
            if reading["noisy"]:
                say(f"benchmark {s}: the machine was busy, speed not judged ({reading['noisy']})")
            for k, e in failures.items():  # that engine's row only; the others keep their timings
                if k in probes:
                    continue
                row = rows[k][s]
                row.status, row.reason, row.crashed = "failed", f"benchmark: {short(e)}", isinstance(e, WorkerCrashed)
            ref: Timing | None = timings.get(REFERENCE)
            for k, t in timings.items():
                rows[k][s].latency_ms = t
                if ref is not None:
                    rows[k][s].speedup = speedup(ref, t)

    def model(self) -> dict[str, Any]:
        c = self._captured
        return {**self.r.bundle.describe(), **({"graph_hash": c.graph_hash, "capture_s": c.capture_s} if c else {})}

    def config(self) -> dict[str, Any]:
        return self.r.cfg.to_dict()

    def environment(self) -> dict[str, Any]:
        return {"contention": self.contention, "harness": self.harness} if self.contention["shapes"] else {}

    def key(self, name: str, precision: Precision) -> str:
        """Everything that changes the engine: graph, backend, precision, build options, device, libraries, shapes."""
        cfg = self.r.cfg
        return digest({"graph": self.captured.graph_hash, "backend": name, "precision": precision.value,
                       "options": cfg.options[name].build_options(), "device": device_info(cfg.device),
                       "requires": registry.get(name).pinned(), "shapes": [str(s) for s in cfg.shapes],
                       **({"quantization": cfg.quant.to_dict()} if precision.quantized else {})}, 20)

    def accept(self, directory: Path, name: str, precision: Precision) -> Acceptance:
        cfg, refs = self.r.cfg, self.refs
        assert refs is not None
        return accept(directory, refs, precision, cfg.device, self.r.engines[REFERENCE], cls_path=self.r.isolated(name),
                      isolated=loads_in_worker(cfg.isolation, name), warmup=cfg.warmup, rounds=cfg.rounds, tolerances=cfg.tolerances,
                      timeout_s=cfg.timeout_s, say=self.r.say)

    def seal(self, directory: Path, name: str, precision: Precision, key: str, verdict: Acceptance, rows: list[Result],
             size_mb: float) -> None:
        """The references the engine passed (kiln verify judges it by them again), the model's
        preprocessor, and the manifest: the model, its inputs, the loaded engine's verdict and speed."""
        r, refs = self.r, self.refs
        assert refs is not None
        bundle, c = r.bundle, self.captured
        store.write_reference(directory, {str(s): refs.saved(s, KINDS) for s in refs.shapes}, refs.task_batches(KINDS))
        manifest.write(directory, manifest.read(directory).with_sections(
            model=ModelRecord(bundle.name, bundle.task, c.graph_hash, bundle.source, tuple(bundle.output_names),
                              bundle.summary.get("labels")),
            inputs={n: {"dtype": str(s.dtype).removeprefix("torch."), "dims": list(s.dims), "high": s.high}
                    for n, s in bundle.inputs.items()},
            axis_ranges={k: list(v) for k, v in bundle.axis_ranges.items()}, versions=r.env["versions"],
            **verdict.manifest(output_axes(bundle)), build_options=r.cfg.options[name].build_options(), cache_key=key,
            describe=rows[0].describe, artifact_mb=size_mb, **store.save_preprocessor(bundle, directory)))
