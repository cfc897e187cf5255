"""Benchmark statistics and the interleaving contract (no timed assertions)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

from pipeline.bench import SETTLE_LIMIT_S, SETTLE_WINDOW_S, MemoryWatch, Timing, benchmark, settle, speedup, steady_allocator, time_call
from pipeline.env import environment


def test_settle_waits_while_a_thread_of_this_process_still_runs() -> None:
    """What follows a timed call: the process's own spinning threads (an OpenMP pool's) must be
    quiet before the next engine is timed. A thread spinning 80 ms keeps settle waiting; a quiet
    process settles in about one window; a thread that never stops is given up on at the limit."""
    import threading
    import time

    assert settle() < 3 * SETTLE_WINDOW_S

    def spinner(seconds: float) -> threading.Thread:
        stop = time.perf_counter() + seconds

        def spin() -> None:
            while time.perf_counter() < stop:
                pass

        t = threading.Thread(target=spin)
        t.start()
        return t

    t = spinner(0.08)
    assert settle() >= 0.06
    t.join()
    t = spinner(SETTLE_LIMIT_S * 3)
    assert SETTLE_LIMIT_S <= settle() < SETTLE_LIMIT_S * 2
    t.join()


def test_the_allocator_keeps_what_a_call_frees() -> None:
    """glibc's mallopt takes both settings here (the CI machine is glibc); the text says what was set."""
    import platform

    text = steady_allocator()
    if platform.libc_ver()[0] != "glibc":
        pytest.skip(f"not glibc: {text}")
    assert text.startswith("glibc keeps freed memory"), text


def test_timing_statistics_on_known_samples() -> None:
    t = Timing([5.0, 1.0, 4.0, 2.0, 3.0])
    assert t.median == 3.0
    assert t.p90 == pytest.approx(4.6)
    assert t.iqr == pytest.approx(2.0)
    d = t.to_dict()
    assert d["n"] == 5 and d["min"] == 1.0 and d["samples"] == [5.0, 1.0, 4.0, 2.0, 3.0]


def test_speedup_is_ratio_of_medians_with_interval() -> None:
    ref = Timing([10.0, 10.5, 9.5, 10.2, 9.8] * 4)
    fast = Timing([5.0, 5.2, 4.8, 5.1, 4.9] * 4)
    s = speedup(ref, fast)
    assert s.value == pytest.approx(2.0)
    assert s.ci_low <= s.value <= s.ci_high
    assert 1.8 < s.ci_low and s.ci_high < 2.2
    same = speedup(ref, ref)
    assert same.value == 1.0 and same.ci_low <= 1.0 <= same.ci_high


class FakeModel:
    device = "cpu"

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self.syncs = name, log, 0

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> Any:
        self.log.append(self.name)

    def synchronize(self) -> None:
        self.syncs += 1


def test_benchmark_warms_up_outside_the_numbers_and_interleaves() -> None:
    log: list[str] = []
    a, b = FakeModel("a", log), FakeModel("b", log)
    out = benchmark({"a": (a, {}), "b": (b, {})}, warmup=3, rounds=10, iters=2)
    assert len(out["a"].samples_ms) == 20 and len(out["b"].samples_ms) == 20
    assert log.count("a") == 3 + 20
    timed = log[6:]
    # interleaved: every round of 4 calls holds both engines
    assert all(set(timed[i:i + 4]) == {"a", "b"} for i in range(0, 40, 4))
    # the order changes between rounds, so neither always goes first
    firsts = {timed[i] for i in range(0, 40, 4)}
    assert firsts == {"a", "b"}
    assert a.syncs >= 20  # every timed call ends with the engine's own sync


def test_time_call_syncs() -> None:
    m = FakeModel("m", [])
    assert time_call(m, {}) >= 0 and m.syncs == 1


def test_memory_watch_sees_an_allocation() -> None:
    with MemoryWatch() as w:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x.add_(1)
        del x
    assert w.peak_host_mb > 30


def test_environment_records_threads_and_versions() -> None:
    env = environment()
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["versions"]["torch"]


def test_tail_and_spread_statistics() -> None:
    t = Timing([float(x) for x in range(1, 101)])
    assert t.p95 == pytest.approx(95.05) and t.p99 == pytest.approx(99.01)
    assert t.mean == pytest.approx(50.5) and t.stdev == pytest.approx(29.0115, rel=1e-4)
    assert {"p95", "p99", "mean", "stdev"} <= set(t.to_dict())


def test_the_speedup_interval_keeps_the_rounds_paired() -> None:
    """Drift that hits both engines in the same round cancels in a paired ratio; resampling the
    two lists on their own would turn it into a wide interval."""
    drift = [1.0, 3.0, 1.5, 2.5, 1.2, 2.8, 1.1, 2.9, 1.4, 2.6]
    s = speedup(Timing([10 * d for d in drift]), Timing([5 * d for d in drift]))
    assert s.value == pytest.approx(2.0) and s.ci_low == pytest.approx(2.0) and s.ci_high == pytest.approx(2.0)
    unpaired = speedup(Timing([10 * d for d in drift]), Timing([5 * d for d in drift[:-1]]))  # a round missing: unpaired
    assert unpaired.ci_high - unpaired.ci_low > 1.0


def test_a_speedup_drifting_between_its_halves_is_noisy_and_drift_that_hits_all_alike_is_not() -> None:
    from pipeline import contention

    ref = [10.0, 10.2, 9.9, 10.1, 13.0, 12.8, 13.1, 13.0]  # the host slowed down half way
    alike = [5.0, 5.1, 4.9, 5.0, 6.5, 6.4, 6.6, 6.5]  # and the engine with it: the ratio held
    apart = [5.0, 5.1, 4.9, 5.0, 3.2, 3.3, 3.2, 3.3]  # it sped up instead: its ratio moved half again
    quiet = contention.judge("1x8", 0.05, ref, {"onnxruntime fp32": alike})
    assert quiet["noisy"] is None and quiet["reference_drift"] == pytest.approx(2.95 / 10.05)
    assert "onnxruntime fp32's speedup moved 99%" in contention.judge("1x8", 0.05, ref, {"onnxruntime fp32": apart})["noisy"]
    nearly = [5.0, 5.1, 4.9, 5.0, 5.0, 4.9, 5.1, 5.0]  # a 29% move: what calls of a millisecond do on a quiet host
    assert contention.judge("1x8", 0.05, ref, {"onnxruntime fp32": nearly})["noisy"] is None
    assert contention.judge("1x8", 0.05, ref[:4], {"x": apart[:4]})["speedup_drift"] is None  # too few rounds to say
    assert "other processes used 60%" in contention.judge("1x8", 0.6, ref, {"x": alike})["noisy"]


def test_a_busy_machine_is_noticed_and_the_gate_does_not_judge_its_speed(tmp_path: Path, cache_dir: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Two CPU-bound processes on the same two cores while tiny-bert is timed: the report says
    noisy instead of presenting ratios, the gate judges accuracy only, and it is no baseline."""
    import json
    import subprocess
    import sys

    from pipeline.cli import main
    from pipeline.report import Report

    out = tmp_path / "run"
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        assert main(["run", "--model", "tiny-bert", "--backends", "eager,onnxruntime", "--shapes", "1x16", "--rounds", "8",
                     "--warmup", "1", "--isolation", "none", "--device", "cpu", "--out", str(out), "--cache-dir", str(cache_dir),
                     "--quiet"]) == 0
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    report = Report.load(out / "report.json")
    assert report.noisy and "other processes used" in report.noisy, report.environment.get("contention")
    assert "Speed not judged: the machine was busy" in (out / "report.md").read_text()
    assert "noisy (" in capsys.readouterr().out
    quiet = json.loads((out / "report.json").read_text())
    quiet["environment"].pop("contention")
    for r in quiet["results"]:  # a baseline ten times faster: a regression, were the speed judged
        if r.get("speedup"):
            r["speedup"] = {k: v * 10 for k, v in r["speedup"].items()}
    (tmp_path / "base.json").write_text(json.dumps(quiet))
    assert main(["check", str(out / "report.json"), "--baseline", str(tmp_path / "base.json")]) == 0
    said = capsys.readouterr().out
    assert "Speed: not judged, machine busy" in said and "| not judged: the machine was busy |" in said
    assert main(["check", str(out / "report.json"), "--baseline", str(tmp_path / "new"), "--update-baseline"]) == 2
    assert "timed on a busy machine" in capsys.readouterr().err and not (tmp_path / "new").exists()
