"""The regression gate on constructed reports: a regression must fail, noise must pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.gate import baseline_from, check
from pipeline.bench import Speedup
from pipeline.report import Report, Result


def _report(speedup: float, ci: float = 0.03, status: str = "ok") -> Report:
    def row(backend: str, s: float, st: str = "ok") -> Result:
        return Result(backend, "fp32", "1x128", st, verdict="pass" if st == "ok" else "fail",
                      speedup=Speedup(s, s * (1 - ci), s * (1 + ci)))
    return Report(model={"name": "tiny-bert", "graph_hash": "abc"}, environment={"cpu": "x"}, config={},
                  results=[row("eager", 1.0), row("onnxruntime", speedup, status)])


BASE = baseline_from(_report(2.0))


def test_noise_passes() -> None:
    checks = check(BASE, _report(1.9))  # -5%, inside the 10% floor
    assert not any(c.failed for c in checks)


def test_a_real_slowdown_fails() -> None:
    (ort,) = [c for c in check(BASE, _report(1.5)) if c.key.startswith("onnxruntime")]
    assert ort.failed and "-25%" in ort.speed and "allowed -10%" in ort.speed


def test_the_threshold_widens_with_noise() -> None:
    noisy = baseline_from(_report(2.0, ci=0.15))
    (ort,) = [c for c in check(noisy, _report(1.5, ci=0.15)) if c.key.startswith("onnxruntime")]
    assert not ort.failed and "allowed -30%" in ort.speed


def test_worse_accuracy_fails_and_missing_rows_fail() -> None:
    (ort,) = [c for c in check(BASE, _report(2.0, status="mismatch")) if c.key.startswith("onnxruntime")]
    assert ort.failed and "ok → mismatch (worse)" in ort.accuracy
    r = _report(2.0)
    r.results = r.results[:1]
    assert any(c.failed and c.accuracy == "missing from the report" for c in check(BASE, r))


def test_cli_exit_codes_and_update(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, good, bad = tmp_path / "base.json", tmp_path / "good.json", tmp_path / "bad.json"
    (tmp_path / "r.json").write_text(_report(2.0).to_json())
    assert main(["check", str(tmp_path / "r.json"), "--baseline", str(base), "--update-baseline"]) == 0
    assert json.loads(base.read_text())["kind"] == "kiln-baseline"
    good.write_text(_report(1.95).to_json())
    bad.write_text(_report(1.0).to_json())
    summary = tmp_path / "summary.md"
    assert main(["check", str(good), "--baseline", str(base), "--summary", str(summary)]) == 0
    assert "## Kiln regression gate: pass" in summary.read_text()
    assert main(["check", str(bad), "--baseline", str(base)]) == 1
    assert "**regression**" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "missing.json"), "--baseline", str(base)]) == 2
    assert main(["check", str(good), "--baseline", str(good)]) == 2  # a report is not a baseline
