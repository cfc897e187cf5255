"""The main job: capture once, compile per backend and precision, compare, benchmark; typed rows out.

The runner prints nothing and saves nothing: progress goes to the callback its caller supplies,
and the engines it built stay on `Runner.engines` for a caller that saves them.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import backends as registry

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

if TYPE_CHECKING:
    from backends.base import CompiledModel

Progress = Callable[[str], None]
Engines = dict[tuple[str, Precision], "CompiledModel"]
log = logging.getLogger("kiln")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


class Runner:
    def __init__(self, bundle: ModelBundle, config: RunConfig, progress: Progress | None = None,
                 cache_dir: Path | None = None) -> None:
        self.bundle, self.cfg = bundle, config
        self.say = progress or (lambda _msg: None)
        self.cache_dir = cache_dir
        self.engines: Engines = {}
        self.references: References | None = None
        for s in config.shapes:
            check_shape(bundle, s)
        check_memory(bundle, config.shapes, config.precisions)

    def run(self, captured: Captured | None = None) -> Report:
        """The whole job; `captured` skips the capture when the caller already has it."""
        cfg = self.cfg
        if captured is None:
            self.say(f"capturing {self.bundle.name} with torch.export (batch and seq dynamic)")
            captured = capture(self.bundle, self.cache_dir)
            self.say(f"captured graph {captured.graph_hash} in {captured.capture_s:.1f}s")
        self.references = refs = References.compute(self.bundle, cfg.shapes, cfg.precisions, self.say)
        rows: dict[tuple[str, Precision], dict[Shape, Result]] = {}
        for name in cfg.engines:
            for p in cfg.precisions_of(name):
                rows[(name, p)] = self._build(captured, name, p, refs)
        self._benchmark(rows, refs)
        return Report(model={**self.bundle.describe(), "graph_hash": captured.graph_hash, "capture_s": captured.capture_s},
                      environment=environment(cfg.device), config=cfg.to_dict(),
                      results=[r for by_shape in rows.values() for r in by_shape.values()],
                      created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def _rows(self, name: str, precision: Precision, status: str, reason: str) -> dict[Shape, Result]:
        return {s: Result(name, precision, s, status, reason) for s in self.cfg.shapes}

    def _build(self, captured: Captured, name: str, precision: Precision, refs: References) -> dict[Shape, Result]:
        cfg, backend = self.cfg, registry.get(name)
        avail = backend.availability(cfg.device)
        if not avail:
            self.say(f"{name}: unavailable: {avail.reason}")
            return self._rows(name, precision, "unavailable", avail.reason)
        sup = backend.supports(precision, cfg.device)
        if not sup:
            return self._rows(name, precision, "unsupported", sup.reason)
        self.say(f"{name} {precision}: compiling")
        results: dict[Shape, Result] = {}
        try:
            with MemoryWatch(cfg.device) as mem:
                model = backend.compile(captured, precision, cfg.device, cfg.options[name], cfg.shapes)
                for s in cfg.shapes:
                    results[s] = self._check(model, s, refs, precision)
        except KilnError as e:
            self.say(f"{name} {precision}: failed: {e}")
            return self._rows(name, precision, "failed", str(e))
        except Exception as e:  # a compiler may raise anything; it becomes a row, the run goes on
            self.say(f"{name} {precision}: failed: {_short(e)}")
            log.debug("%s %s failed", name, precision, exc_info=True)
            return self._rows(name, precision, "failed", _short(e))
        self.engines[(name, precision)] = model
        info, notes = model.describe(), model.notes()
        for r in results.values():
            r.peak_host_mb, r.peak_device_mb = mem.peak_host_mb, mem.peak_device_mb
            r.describe = {**r.describe, **info}
            if notes:
                r.reason = "; ".join([r.reason, *notes] if r.reason else notes)
        return results

    def _check(self, model: CompiledModel, shape: Shape, refs: References, precision: Precision) -> Result:
        first = {k: v.to(self.cfg.device) for k, v in refs.batches[shape][0].items()}
        cold = time_call(model, first)  # first call at this shape: lazy compilers compile here
        c = refs.judge(model, [shape], precision, self.cfg.tolerances)
        worst = c.worst
        agree = next((o for o in c.outputs if o.agreement is not None), None)
        return Result(model.backend, precision, shape, "ok" if c.passed else "mismatch",
                      reason="" if c.passed else c.reason, verdict="pass" if c.passed else "fail",
                      max_abs=worst.max_abs if worst else None, cosine=min(o.cosine for o in c.outputs),
                      agreement=agree.agreement if agree else None, agreement_kind=agree.agreement_kind if agree else None,
                      compile_s=model.build_s + cold / 1e3, comparison=c)

    def _benchmark(self, rows: dict[tuple[str, Precision], dict[Shape, Result]], refs: References) -> None:
        cfg = self.cfg
        for s in cfg.shapes:
            live = [k for k in self.engines if rows[k][s].status in ("ok", "mismatch")]
            if not live:
                continue
            self.say(f"benchmark {s}: {len(live)} engines, {cfg.warmup} warm-up + {cfg.rounds} interleaved rounds")
            inputs = {k: v.to(cfg.device) for k, v in refs.batches[s][0].items()}
            try:
                timings = benchmark({k: (self.engines[k], inputs) for k in live}, warmup=cfg.warmup, rounds=cfg.rounds)
            except Exception as e:
                for k in live:
                    rows[k][s].status, rows[k][s].reason = "failed", f"benchmark: {_short(e)}"
                continue
            ref: Timing | None = timings.get(REFERENCE)
            for k in live:
                rows[k][s].latency_ms = timings[k]
                if ref is not None:
                    rows[k][s].speedup = speedup(ref, timings[k])
