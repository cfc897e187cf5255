"""The CLI in-process and the runner's handling of failing backends."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import backends as registry
from backends.base import Backend, CompiledModel, ok
from backends.eager import EagerBackend, EagerModel
from pipeline.cli import main
from pipeline.precision import Precision
from pipeline.report import Report

ROW_KEYS = {"backend", "precision", "shape", "status", "reason", "verdict", "latency_ms", "speedup"}


def test_backends_lists_availability(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "eager" in out and "onnxruntime" in out and "available" in out


@pytest.mark.parametrize("argv, message", [
    (["run", "--model", "nope"], "unknown model 'nope'; valid:"),
    (["run", "--backends", "eager,nope"], "unknown backend 'nope'; valid: eager"),
    (["run", "--precisions", "fp8"], "unknown precision 'fp8'; valid: bf16, fp16, fp32"),
    (["run", "--shapes", "8by128"], "malformed shape '8by128'"),
    (["run", "--model", "tiny-bert", "--shapes", "1x4096"], "seq 4096 is outside tiny-bert's range"),
    (["run", "--option", "inductor.mdoe=x"], "unknown option(s) mdoe"),
    (["run", "--option", "nonsense"], "malformed --option"),
    (["run", "--rounds", "0"], "--rounds 0: must be an integer >= 1"),
    (["run", "--shapes", ","], "no shapes given"),
    (["run", "--option", "tvm.budget_s=nan"], "budget_s='nan': must be a finite number"),
    (["run", "--option", "tvm.trials_per_task=-1"], "trials_per_task=-1: must be 0 (no tuning) or more"),
    (["run", "--option", "onnxruntime.intra_op_threads=-1"], "option intra_op_threads=-1: must be >= 0"),
    (["run", "--model", "gpt2", "--shapes", "64x1024", "--backends", "eager"], "use smaller shapes than 64x1024"),
])
def test_bad_input_is_one_line_without_traceback(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    assert main([*argv, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_run_writes_a_report_scripts_can_read(tmp_path: Path, capsys: pytest.CaptureFixture[str], cache_dir: Path) -> None:
    out = tmp_path / "run"
    rc = main(["run", "--model", "tiny-bert", "--backends", "eager,onnxruntime", "--precisions", "fp32,bf16",
               "--shapes", "1x16,2x32", "--rounds", "3", "--warmup", "1", "--out", str(out), "--cache-dir", str(cache_dir),
               "--quiet", "--device", "cpu"])
    assert rc == 0
    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"] == 1 and {"environment", "model", "results"} <= set(data)
    rows = {(r["backend"], r["precision"], r["shape"]): r for r in data["results"]}
    assert len(rows) == 8 and all(ROW_KEYS <= set(r) for r in rows.values())
    ok = rows[("onnxruntime", "fp32", "2x32")]
    assert ok["status"] == "ok" and ok["verdict"] == "pass"
    assert len(ok["latency_ms"]["samples"]) == 3 and ok["latency_ms"]["median"] > 0
    assert ok["speedup"]["ci_low"] <= ok["speedup"]["value"] <= ok["speedup"]["ci_high"]
    assert rows[("eager", "fp32", "1x16")]["speedup"]["value"] == 1.0
    assert rows[("onnxruntime", "bf16", "1x16")]["status"] == "unsupported"
    assert "bf16" in rows[("onnxruntime", "bf16", "1x16")]["reason"]
    assert rows[("eager", "bf16", "2x32")]["status"] == "ok"
    printed = capsys.readouterr().out
    assert "| onnxruntime | fp32 | 2x32 | ok |" in printed
    assert Report.load(out / "report.json").find("onnxruntime", "fp32", "2x32") is not None
    assert (out / "report.md").read_text().startswith("# Kiln report: tiny-bert")
    # the picture: every timed row's speedup with its interval, linked from report.md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![speedup over eager fp32 with 95% intervals](report.png)" in (out / "report.md").read_text()


class _Raising(Backend):
    name = "raises-for-test"
    support = {Precision.FP32: ok()}

    def _compile(self, captured: Any, spec: Any, shapes: Any) -> CompiledModel:
        raise RuntimeError("kernel generation exploded\nsecond line")

    def _load(self, directory: Any, spec: Any, manifest: Any) -> CompiledModel:
        raise NotImplementedError


class _NaNModel(EagerModel):
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().run(inputs)
        return {k: v.clone().fill_(float("nan")) for k, v in out.items()}


class _NaNBackend(EagerBackend):
    name = "nan-for-test"

    def _compile(self, captured: Any, spec: Any, shapes: Any) -> CompiledModel:
        m = super()._compile(captured, spec, shapes)
        return _NaNModel(spec, m.module, m.program)  # type: ignore[attr-defined]


@pytest.fixture
def broken_backends() -> Any:
    for b in (_Raising(), _NaNBackend()):
        registry.register(b)
    yield
    for n in ("raises-for-test", "nan-for-test"):
        registry.unregister(n)


def test_failing_backends_become_rows_and_the_report_is_still_written(broken_backends: Any, tmp_path: Path,
                                                                      cache_dir: Path) -> None:
    rc = main(["run", "--model", "tiny-bert", "--backends", "eager,raises-for-test,nan-for-test", "--shapes", "1x8",
               "--rounds", "2", "--warmup", "1", "--out", str(tmp_path), "--cache-dir", str(cache_dir), "--quiet", "--device", "cpu"])
    assert rc == 0
    r = Report.load(tmp_path / "report.json")
    failed = r.find("raises-for-test", "fp32", "1x8")
    assert failed is not None and failed.status == "failed" and failed.reason == "RuntimeError: kernel generation exploded"
    nan = r.find("nan-for-test", "fp32", "1x8")
    assert nan is not None and nan.status == "mismatch" and nan.verdict == "fail" and "NaN or Inf" in nan.reason
    eager = r.find("eager", "fp32", "1x8")
    assert eager is not None and eager.status == "ok"


def test_options_reach_the_backend(tmp_path: Path, cache_dir: Path) -> None:
    from pipeline import run

    report = run("tiny-bert", backends="onnxruntime", shapes="1x8", device="cpu", rounds=2, warmup=1, cache_dir=cache_dir,
                 options={"onnxruntime": {"fuse": False}})
    row = report.find("onnxruntime", "fp32", "1x8")
    assert row is not None and row.status == "ok"
    assert row.describe["fusions_onnxscript"] == {}
    assert report.config["options"]["onnxruntime"]["fuse"] is False


def test_report_round_trips_and_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import fsutil
    from pipeline import report as rep

    r = Report(model={"name": "m"}, environment={}, config={}, results=[rep.Result("eager", "fp32", "1x8", "ok", verdict="pass")])
    r.save(tmp_path)
    before = (tmp_path / "report.json").read_text()
    assert Report.from_dict(json.loads(before)).results == r.results

    def boom(*a: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fsutil.os, "replace", boom)
    r.results[0].status = "failed"
    with pytest.raises(OSError):
        r.save(tmp_path)
    assert (tmp_path / "report.json").read_text() == before  # the old report is whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_bad_model_directories_and_build_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "mine", "architectures": ["Mine"],
                                                    "auto_map": {"AutoConfig": "conf.MineConfig", "AutoModel": "model.Mine"}}))
    assert main(["run", "--model", str(remote), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "trust_remote_code" in capsys.readouterr().err
    assert main(["build", "--backends", "", "--model", "tiny-bert", "--root", str(tmp_path / "root"), "--quiet"]) == 2
    assert "name the engines to build" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "root").exists()


def test_engine_directories_never_leave_the_root() -> None:
    from pipeline.errors import InputError
    from pipeline.fsutil import safe_name

    for bad in ("..", ".", "a/b", ""):
        with pytest.raises(InputError, match="would leave it"):
            safe_name(bad)
    assert safe_name("tiny-bert") == "tiny-bert"


class _Aborting(Backend):
    name = "aborts-for-test"
    support = {Precision.FP32: ok()}

    def _compile(self, captured: Any, spec: Any, shapes: Any) -> CompiledModel:
        print("about to abort in native code", file=sys.stderr, flush=True)
        os.abort()

    def _load(self, directory: Any, spec: Any, manifest: Any) -> CompiledModel:
        raise NotImplementedError


class _Segfaulting(_Aborting):
    name = "segfaults-for-test"

    def _compile(self, captured: Any, spec: Any, shapes: Any) -> CompiledModel:
        os.kill(os.getpid(), signal.SIGSEGV)
        raise AssertionError("not reached")


@pytest.fixture
def crashing_backends() -> Any:
    for b in (_Aborting(), _Segfaulting()):
        registry.register(b)
    yield
    for n in ("aborts-for-test", "segfaults-for-test"):
        registry.unregister(n)


@pytest.mark.slow
def test_a_crash_costs_one_row(crashing_backends: Any, tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["run", "--model", "tiny-bert", "--backends", "eager,aborts-for-test,onnxruntime,segfaults-for-test",
               "--shapes", "1x8", "--rounds", "2", "--warmup", "1", "--out", str(tmp_path), "--cache-dir", str(cache_dir),
               "--quiet", "--device", "cpu"])
    assert rc == 1 and "crashed" in capsys.readouterr().err
    r = Report.load(tmp_path / "report.json")
    aborted, segv = r.find("aborts-for-test", "fp32", "1x8"), r.find("segfaults-for-test", "fp32", "1x8")
    assert aborted is not None and aborted.status == "failed" and aborted.crashed and "SIGABRT" in aborted.reason
    assert "about to abort in native code" in aborted.reason  # the last lines of the worker's stderr
    assert segv is not None and segv.crashed and "SIGSEGV" in segv.reason
    for ok in ("eager", "onnxruntime"):
        row = r.find(ok, "fp32", "1x8")
        assert row is not None and row.status == "ok" and row.speedup is not None


class _Ballast(Backend):
    """The eager engine holding 256 MiB it allocated while compiling: its worker's peak must show it."""

    name = "ballast-for-test"
    support = {Precision.FP32: ok()}

    def _compile(self, captured: Any, spec: Any, shapes: Any) -> CompiledModel:
        model = EagerModel(spec, captured.bundle.module, captured.program)
        model.ballast = torch.ones(64 * 2**20)  # type: ignore[attr-defined]  # float32, every page touched
        return model

    def _load(self, directory: Any, spec: Any, manifest: Any) -> CompiledModel:
        raise NotImplementedError


def test_a_worker_reports_its_own_peak_memory(tmp_path: Path, cache_dir: Path) -> None:
    """Each worker row's peak is that worker's (VmHWM from its own start), not the parent's ru_maxrss
    a child inherits across fork and exec, which read the same for every row (or 0 after subtracting)."""
    from pipeline.config import make_config
    from pipeline.models import load_model
    from pipeline.runner import Runner

    import tempfile

    stale = Path(tempfile.gettempdir()) / "kiln-worker-999999999-left"  # a killed run's worker directory
    stale.mkdir(exist_ok=True)
    registry.register(_Ballast())
    try:
        cfg = make_config(backends="ballast-for-test,onnxruntime", shapes="1x8", device="cpu", rounds=1, warmup=0)
        runner = Runner(load_model("tiny-bert"), cfg, cache_dir=cache_dir)
        assert runner.isolated("ballast-for-test") and runner.isolated("onnxruntime")  # both in workers
        report = runner.run()
        runner.close()
    finally:
        registry.unregister("ballast-for-test")
    ballast, ort = report.find("ballast-for-test", "fp32", "1x8"), report.find("onnxruntime", "fp32", "1x8")
    assert 250 <= ballast.peak_host_mb < 600, ballast.peak_host_mb  # 256 MiB and what compiling tiny-bert adds
    assert 0 < ort.peak_host_mb < 250  # its own: the other worker's 256 MiB are not in it
    assert not stale.exists()  # cleaned when the next worker started
    # the harness's own cost, an empty call timed in the same rounds here and in a worker: both
    # well under a millisecond and within half of one of each other (the message passing is outside the timed region)
    noop = report.environment["harness"]["noop_ms"]["1x8"]
    assert set(noop) == {"in process", "in a worker"}, noop
    assert max(noop.values()) < 1.0 and abs(noop["in process"] - noop["in a worker"]) < 0.5, noop
    assert "an empty call, timed the same way" in report.to_markdown()


def test_the_report_is_written_after_every_backend(tmp_path: Path, cache_dir: Path) -> None:
    from pipeline.config import make_config
    from pipeline.models import load_model
    from pipeline.runner import Runner

    seen: list[list[str]] = []
    cfg = make_config(backends="eager,onnxruntime", shapes="1x8", device="cpu", rounds=1, warmup=0, isolation="none")
    runner = Runner(load_model("tiny-bert"), cfg, cache_dir=cache_dir,
                    checkpoint=lambda rep: seen.append(sorted({x.backend for x in rep.results})))
    runner.run()
    runner.close()
    assert seen == [["eager"], ["eager", "onnxruntime"]]


class _Chatty(Backend):
    """Reports progress while it compiles, then hands over the eager engine."""

    name = "chatty-for-test"
    support = {Precision.FP32: ok()}

    def _compile(self, captured: Any, spec: Any, shapes: Any) -> CompiledModel:
        from backends.eager import EagerModel
        from pipeline import progress

        for step in (1, 2):
            progress.report(f"step {step} of 2")
        return EagerModel(spec, captured.bundle.module, captured.program)

    def _load(self, directory: Any, spec: Any, manifest: Any) -> CompiledModel:
        raise NotImplementedError


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_progress_of_a_long_compile_reaches_the_caller(isolation: str, cache_dir: Path) -> None:
    """One channel, in this process or from a worker over its socket: the backend reports, the
    runner's progress callback prints it with the engine's name."""
    from pipeline.config import make_config
    from pipeline.models import load_model
    from pipeline.runner import Runner

    registry.register(_Chatty())
    try:
        lines: list[str] = []
        cfg = make_config(backends="chatty-for-test", shapes="1x8", device="cpu", rounds=1, warmup=0, isolation=isolation)
        runner = Runner(load_model("tiny-bert"), cfg, progress=lines.append, cache_dir=cache_dir)
        report = runner.run()
        runner.close()
    finally:
        registry.unregister("chatty-for-test")
    assert [x for x in lines if "step" in x] == ["chatty-for-test fp32: step 1 of 2", "chatty-for-test fp32: step 2 of 2"]
    assert report.find("chatty-for-test", "fp32", "1x8").status == "ok"


class _Sleepy(Backend):
    """Compiles for 0.3 s without a word: the runner must still show that it is at work."""

    name = "sleepy-for-test"
    support = {Precision.FP32: ok()}

    def _compile(self, captured: Any, spec: Any, shapes: Any) -> CompiledModel:
        time.sleep(0.3)
        return EagerModel(spec, captured.bundle.module, captured.program)

    def _load(self, directory: Any, spec: Any, manifest: Any) -> CompiledModel:
        raise NotImplementedError


def test_a_long_stage_is_never_silent_and_never_floods(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    from pipeline import progress
    from pipeline.config import make_config
    from pipeline.models import load_model
    from pipeline.runner import Runner

    heard: list[str] = []
    with progress.ticking(heard.append, "exporting", every_s=0.05):
        time.sleep(0.32)
    assert len(heard) >= 3 and heard[0].startswith("exporting (") and heard[0].endswith("s so far)")
    passed: list[str] = []
    tick = progress.throttled(passed.append, every_s=3600)
    for i in range(50):
        tick(f"round {i + 1}/50", i == 49)
    assert passed == ["round 50/50"]  # one line at most per period, and the last
    monkeypatch.setattr(progress, "TICK_S", 0.05)
    registry.register(_Sleepy())
    try:
        lines: list[str] = []
        cfg = make_config(backends="sleepy-for-test", shapes="1x8", device="cpu", rounds=3, warmup=0, isolation="none")
        runner = Runner(load_model("tiny-bert"), cfg, progress=lines.append, cache_dir=cache_dir)
        runner.run()
        runner.close()
    finally:
        registry.unregister("sleepy-for-test")
    assert any(x.startswith("sleepy-for-test fp32: compiling and checking (") for x in lines), lines
    assert "benchmark 1x8: round 3/3" in lines, lines


def test_tuning_progress_line() -> None:
    from types import SimpleNamespace

    from backends.tvm.tune import Tracker, _run_ms
    from pipeline import progress

    t = Tracker(128, time.monotonic() + 30, 600, built=40, measured=3, best_ms={0: 1.5, 1: 0.5}, weights=[2.0, 1.0])
    assert t.line().startswith("tuning: 40 candidates built, 3/128 trials measured, best so far 3.50 ms, ")
    assert t.line().endswith("s left of the 600s budget")
    spent = Tracker(8, 0.0, 10, best_ms={0: 1.5}, weights=[2.0, 1.0]).line()
    assert "1/2 kernels measured" in spent and "budget is spent: finishing the round" in spent
    heard: list[str] = []
    quiet, due = Tracker(8, 0.0, 10, every_s=3600), Tracker(8, 0.0, 10, every_s=0)
    with progress.to(heard.append):
        quiet.tick()
        due.tick()
    assert len(heard) == 1 and heard[0].startswith("tuning: 0 candidates built")
    assert _run_ms(SimpleNamespace(error_msg=None, run_secs=[0.001, 0.003])) == pytest.approx(2.0)
    assert _run_ms(SimpleNamespace(error_msg="failed to build", run_secs=None)) is None


def test_progress_is_a_rich_bar_on_a_terminal_and_plain_lines_elsewhere(capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from rich.console import Console

    from pipeline.progress import Bar, Lines, display as _progress

    assert type(_progress()) is Lines  # stderr is captured here, not a terminal: CI logs get plain lines
    out = io.StringIO()
    bar = Bar(Console(file=out, force_terminal=True, width=120))
    bar("tvm fp32: tuning: 40 candidates built, 12/64 trials measured, 500s left of the 600s budget")
    task = bar.bar.tasks[0]
    assert (task.completed, task.total) == (12, 64)
    bar("tvm fp32: saving")
    assert bar.bar.tasks[0].total is None  # no count: a spinner, not a stale bar
    bar.close()
    text = out.getvalue()
    assert "12/64 trials measured" in text and "tvm fp32: saving" in text  # every line is kept above the bar


def test_no_cache_and_cache_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--no-cache neither reads nor fills a cache (its own is removed when the command ends);
    kiln cache clean empties one."""
    import subprocess
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("kiln-nocache-*"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    p = subprocess.run([sys.executable, "-m", "pipeline", "run", "--model", "tiny-bert", "--backends", "eager", "--shapes", "1x8",
                        "--rounds", "1", "--warmup", "0", "--no-cache", "--quiet", "--out", "run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "report.json").is_file() and not (tmp_path / "artifacts").exists()
    assert set(Path(tempfile.gettempdir()).glob("kiln-nocache-*")) == before
    assert main(["run", "--no-cache", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "give one of them" in capsys.readouterr().err
    cache = tmp_path / "cache"
    (cache / "onnx" / "entry").mkdir(parents=True)
    (cache / "onnx" / "entry" / "model.onnx").write_bytes(b"x" * 2048)
    assert main(["cache", "clean", "--cache-dir", str(cache)]) == 0
    assert "removed 1 files (0.0 MB) from the cache at" in capsys.readouterr().out and list(cache.iterdir()) == []
    assert main(["cache", "clean", "--cache-dir", str(tmp_path / "none")]) == 0 and "no cache at" in capsys.readouterr().out
