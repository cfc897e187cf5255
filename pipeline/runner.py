"""The one job over a workload: prepare once, compile per backend and precision, check, time; typed rows out.

What a job does with a model is a `Workload`: forward passes (`forward.Forward`) or greedy
generation (`genrun.Generate`). The runner, written once over it, owns what both share: the order
(the reference first), the support table's refusals, a failure as a row, worker isolation (every
backend but the reference compiles, checks and runs in a worker process of its own, so a native
crash, abort, OOM or hang costs that backend's row), the report after each backend (`checkpoint`,
so a killed run loses at most the row in flight), and the engines it built (`Runner.engines`, for
a caller that saves them until `close()`). It prints nothing and saves nothing itself.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import backends as registry

from . import progress
from .bench import MemoryWatch
from .config import REFERENCE, RunConfig
from .env import environment
from .errors import short
from .forward import Forward
from .generation import Generate
from .inputs import Shape
from .models import ModelBundle
from .precision import Precision
from .report import Report, Result
from .worker import RemoteEngine, WorkerCrashed, isolated
from .workload import Engine, Engines, Rows, Workload

Progress = Callable[[str], None]
WORKLOADS: dict[str, Callable[[Any], Workload]] = {"forward": Forward, "generate": Generate}
log = logging.getLogger("kiln")


class Runner:
    def __init__(self, bundle: ModelBundle, config: RunConfig, progress: Progress | None = None,
                 cache_dir: Path | None = None, checkpoint: Callable[[Report], None] | None = None) -> None:
        """The config's mode names the workload, made from this runner; it checks what it is given
        against the model before anything is captured."""
        self.bundle, self.cfg = bundle, config
        self.say = progress or (lambda _msg: None)
        self.cache_dir, self.checkpoint = cache_dir, checkpoint
        self.engines: Engines = {}
        self.env = environment(config.device, registry.libraries())  # read once: the report is rewritten after each engine
        self.workload: Workload = WORKLOADS[config.mode](self)

    def run(self, timed: bool = True, backends: Sequence[str] | None = None) -> Report:
        """The whole job: `timed=False` skips the timing (a build times the engines it loads back
        instead); `backends` narrows the configured ones (the reference always runs)."""
        w, cfg = self.workload, self.cfg
        w.prepare()
        rows: Rows = {}
        for name in dict.fromkeys([REFERENCE[0], *(cfg.backends if backends is None else backends)]):
            for p in cfg.precisions_of(name):
                rows[(name, p)] = self._build(name, p)
                if self.checkpoint:
                    self.checkpoint(self._report(rows))
        if timed:
            w.time(self.engines, rows)
        return self._report(rows)

    def _report(self, rows: Rows) -> Report:
        w = self.workload
        return Report(model=w.model(), environment={**self.env, **w.environment()}, config=w.config(),
                      results=[r for by_shape in rows.values() for r in by_shape.values()],
                      created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), mode=w.mode)

    def worker_pids(self) -> list[int]:
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

    def _compile_and_check(self, name: str, precision: Precision) -> tuple[Engine, dict[Shape, Result], dict[str, Any]]:
        """The engine, in a worker or here; its row at every shape; and what it says of itself
        (describe, notes) and of its peak memory."""
        w, cls_path = self.workload, self.isolated(name)
        say = lambda message: self.say(f"{name} {precision}: {message}")  # noqa: E731
        if cls_path is None:
            with MemoryWatch(self.cfg.device) as watch, progress.to(say), progress.ticking(say, "compiling and checking"):
                model = w.compile_here(name, precision)
                results = w.check(model, name, precision)
            return model, results, {"describe": model.describe(), "notes": model.notes(), "peak_host_mb": watch.peak_host_mb,
                                    "peak_device_mb": watch.peak_device_mb}
        remote = RemoteEngine.make(f"{name} {precision}", self.cfg.timeout_s, say, *w.request(name, precision, cls_path))
        try:
            return remote, w.check(remote, name, precision), remote.info()
        except BaseException:
            remote.close()
            raise

    def _build(self, name: str, precision: Precision) -> dict[Shape, Result]:
        refusal = registry.get(name).refusal(precision, self.cfg.device, generate=self.workload.mode == "generate")
        if refusal:
            if refusal[0] == "unavailable":
                self.say(f"{name}: unavailable: {refusal[1]}")
            return self._rows(name, precision, *refusal)
        self.say(f"{name} {precision}: compiling" + (" in a worker process" if self.isolated(name) else ""))
        try:
            model, results, info = self._compile_and_check(name, precision)
        except Exception as e:  # a compiler may raise anything; it becomes a row, the run goes on
            self.say(f"{name} {precision}: failed: {short(e)}")
            log.debug("%s %s failed", name, precision, exc_info=True)
            return self._rows(name, precision, "failed", "; ".join((short(e), *self.bundle.notes)), crashed=isinstance(e, WorkerCrashed))
        self.engines[(name, precision)] = model
        for r in results.values():  # what the engine says of itself, and how the model was loaded or captured
            r.peak_host_mb, r.peak_device_mb = info.get("peak_host_mb"), info.get("peak_device_mb")
            r.describe = {**r.describe, **info["describe"]}
            r.engine = str(info["describe"].get("engine", ""))
            r.reason = "; ".join(x for x in (r.reason, *info["notes"], *self.bundle.notes) if x)
        return results
