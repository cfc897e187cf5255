"""MetaSchedule tuning under a wall-clock budget into a reusable database.

This module holds every work-around Kiln needs around MetaSchedule in TVM 0.27, so that the rest
of the backend reads as plain TVM: a budget that stops tuning from a measure callback, candidates
built in process, and a faster first import of TVM's tensor intrinsics. What each one bought is
measured in docs/benchmarks.md (Apache TVM).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import progress
from pipeline.fsutil import atomic_write, sha256


class BudgetSpent(Exception):
    """Raised from inside MetaSchedule to stop tuning at the deadline."""


def check_budget(deadline: float, task_id: int, measured: int, n_tasks: int) -> None:
    """Past the deadline, stop, but only once every task has been measured at least once: a kernel
    with no record keeps no schedule at all (naive loops, far slower than any overrun costs)."""
    if time.monotonic() > deadline and measured >= n_tasks:
        raise BudgetSpent(f"tuning budget spent at task {task_id}")


@dataclass
class Tracker:
    """What a live tuning line says: candidates built, trials measured of those planned, the model's
    latency estimated from each kernel's best so far (weighted by how often the model calls it),
    the budget left. MetaSchedule measures the first round of every kernel before any measure
    callback runs (minutes on a large model), so the builder's batches count too."""

    planned: int
    deadline: float
    budget_s: float
    every_s: float = 10.0
    built: int = 0
    measured: int = 0
    best_ms: dict[int, float] = field(default_factory=dict)
    weights: list[float] = field(default_factory=list)
    said: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        if self.weights and len(self.best_ms) == len(self.weights):
            estimate = f", best so far {sum(ms * self.weights[i] for i, ms in self.best_ms.items()):.2f} ms"
        elif self.weights:
            estimate = f", {len(self.best_ms)}/{len(self.weights)} kernels measured"
        else:
            estimate = ""
        left = self.deadline - time.monotonic()
        # past the deadline tuning goes on until every kernel has one measurement (check_budget)
        budget = (f"{left:.0f}s left of the {self.budget_s:.0f}s budget" if left > 0 else
                  f"the {self.budget_s:.0f}s budget is spent: finishing the round that measures every kernel once")
        return f"tuning: {self.built} candidates built, {self.measured}/{self.planned} trials measured{estimate}, {budget}"

    def tick(self) -> None:
        if time.monotonic() - self.said >= self.every_s:  # a live line for whoever waits (pipeline.progress)
            self.said = time.monotonic()
            progress.report(self.line())


def _run_ms(result: Any) -> float | None:
    """A runner result's mean time in ms; None for a failed candidate."""
    if getattr(result, "error_msg", None) or not getattr(result, "run_secs", None):
        return None
    secs = [float(getattr(s, "value", s)) for s in result.run_secs]
    return 1e3 * sum(secs) / len(secs)


def _budget_callback(deadline: float, tracker: Tracker | None = None) -> Any:
    """Stops tuning once the deadline has passed. It runs after AddToDatabase, so every measured
    batch is already in the JSON database (which writes each record as it comes). Raising is the
    stop MetaSchedule honours at once; terminating tasks from a callback races its own clean-up,
    which then terminates a finished task a second time and fails."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    measured: set[int] = set()

    @derived_object
    class Budget(PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, candidates: Any = (), builds: Any = (), runs: Any = ()) -> None:
            measured.add(task_id)
            if tracker is not None:
                tracker.measured += len(runs)
                for ms in filter(None, map(_run_ms, runs)):
                    tracker.best_ms[task_id] = min(tracker.best_ms.get(task_id, ms), ms)
                tracker.weights = [float(t.task_weight) for t in task_scheduler.tasks_]
                tracker.tick()
            check_budget(deadline, task_id, len(measured), len(task_scheduler.tasks_))

    return Budget()


def build_candidate(mod: Any, target: Any) -> str:
    """One MetaSchedule candidate compiled and packed for the runner: MetaSchedule's default_build
    without its `import tvm.s_tir.tensor_intrin`. That import registers the CUDA/ROCm/ARM intrinsics
    and is paid again by every fresh builder worker, once per batch; an fp32 CPU candidate arrives
    already scheduled and never names those intrinsics."""
    import tempfile

    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    rt = tvm.driver.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)
    path = str(Path(tempfile.mkdtemp(prefix="kiln-ms-")) / f"candidate.{tar.output_format}")
    rt.export_library(path, fcompile=tar)
    return path


def _in_process_builder(tracker: Tracker | None = None) -> Any:
    """Builds candidates in this process instead of a fresh worker pool per batch."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for bi in build_inputs:
                try:
                    results.append(BuilderResult(build_candidate(bi.mod, bi.target), None))
                except Exception as e:  # a candidate that fails to build is a measured failure, not a crash
                    results.append(BuilderResult(None, f"{type(e).__name__}: {e}"))
            if tracker is not None:
                tracker.built += len(build_inputs)
                tracker.tick()
            return results

    return InProcessBuilder()


def _import_tensor_intrin() -> None:
    """MetaSchedule's TuneContext imports tvm.s_tir.tensor_intrin, whose TVMScript intrinsics each
    call inspect.stack(). With the source lines that reads (context=1), every frame's module lookup
    scans sys.modules, which is slow in a process that has torch and transformers loaded. The
    parser reads only frame locals and, for class-scope detection, a code line it treats as absent
    when None, so context=0 registers the same intrinsics. The patch lives only for this import."""
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    stack = inspect.stack
    inspect.stack = lambda context=1: stack(0)  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = stack


def _database_files(work_dir: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(work_dir.glob("database_*.json"))}


def repair_jsonl(path: Path) -> int:
    """Drops the lines a killed tuning left half-written (MetaSchedule's JSON database holds one
    record per line, appended as measured); returns how many were dropped."""
    if not path.is_file():
        return 0
    good, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            json.loads(line)
            good.append(line)
        except ValueError:
            dropped += 1
    if dropped:
        atomic_write(path, "".join(f"{line}\n" for line in good))
    return dropped


def tune(mod: Any, target: Any, work_dir: Path, trials_per_task: int, budget_s: float) -> dict[str, Any]:
    """MetaSchedule into work_dir's JSON database; the caller holds work_dir's lock. A database that
    got these trials, or was cut short by at least this budget, and whose files still hash as they
    did when it was done, is reused as is; otherwise tuning resumes from its whole records."""
    from tvm.s_tir import meta_schedule as ms

    marker = work_dir / "kiln-tuned.json"
    records = work_dir / "database_tuning_record.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        enough = (done.get("budget_s", 0) >= budget_s) if done.get("hit_budget") else (done.get("trials_per_task", 0) >= trials_per_task)
        if enough and done.get("files") == _database_files(work_dir):
            return {**done, "reused": True}
    marker.unlink(missing_ok=True)  # from here until it is written again, this database is not done
    work_dir.mkdir(parents=True, exist_ok=True)
    for part in work_dir.glob("database_*.json"):
        repair_jsonl(part)
    t0 = time.monotonic()
    _import_tensor_intrin()
    n_tasks = len(ms.relax_integration.extract_tasks(mod, target))
    tracker = Tracker(trials_per_task * n_tasks, t0 + budget_s, budget_s)
    callbacks = [*ms.MeasureCallback.create("default"), _budget_callback(t0 + budget_s, tracker)]
    cut = False
    try:
        # The gradient scheduler measures every task once, then gives each round of trials to the
        # task whose weighted latency is falling fastest: the matrix products, not the reshapes.
        ms.relax_integration.tune_relax(mod, {}, target, str(work_dir), max_trials_global=trials_per_task * n_tasks,
                                        max_trials_per_task=trials_per_task, num_trials_per_iter=min(16, trials_per_task),
                                        measure_callbacks=callbacks, seed=0, builder=_in_process_builder(tracker),
                                        task_scheduler="gradient")
    except Exception as e:  # the FFI hands BudgetSpent back wrapped in its own error type
        if "tuning budget spent" not in str(e):
            raise
        cut = True
    measured = len(records.read_text().splitlines()) if records.is_file() else 0
    info = {"trials_per_task": trials_per_task, "budget_s": budget_s, "tasks": n_tasks, "trials_measured": measured,
            "seconds": round(time.monotonic() - t0, 1), "hit_budget": cut}
    atomic_write(marker, json.dumps({**info, "files": _database_files(work_dir)}))
    return {**info, "reused": False}


def apply_database(mod: Any, target: Any, work_dir: Path) -> tuple[Any, list[str]]:
    """The tuned schedules applied; weights whose layout a schedule rewrote are repacked once, at
    build time (the rewrite is split out and folded over the constant weights). Also returns the
    kernels that found no schedule in the database (they run as generated: naive loops)."""
    import tvm
    from tvm import relax

    with target:
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
        unscheduled = sorted(str(g.name_hint) for g, f in mod.functions.items()
                             if isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.is_scheduled", False))
        mod = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant()])(mod)
    return mod, unscheduled
