"""The regression gate on constructed reports: a regression must fail, noise must pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import InputError
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
    assert main(["check", str(bad), "--baseline", str(good)]) == 1  # a report is taken as the baseline it would write
    assert main(["check", str(good), "--baseline", str(good)]) == 0
    (tmp_path / "list.json").write_text("[]")
    capsys.readouterr()
    assert main(["check", str(good), "--baseline", str(tmp_path / "list.json")]) == 2
    assert "neither a Kiln baseline nor a report" in capsys.readouterr().err
    fresh = tmp_path / "new-baselines"  # a missing directory: created, and this host kind's file written in it
    assert main(["check", str(good), "--baseline", str(fresh), "--update-baseline"]) == 0
    assert [p.name for p in fresh.iterdir()] == ["unknown-host.json"]


def _with(r: Report, **model: str) -> Report:
    r.model.update(model)
    return r


def test_the_interval_widens_the_allowed_drop_by_a_capped_amount() -> None:
    very_noisy = baseline_from(_report(2.0, ci=0.5))
    (ort,) = [c for c in check(very_noisy, _report(1.3, ci=0.5)) if c.key.startswith("onnxruntime")]
    assert ort.failed and "allowed -30%" in ort.speed  # floor 10% + the 20% cap, not the 100% the noise asks


def test_error_growing_past_its_tolerance_is_an_accuracy_regression() -> None:
    from pipeline.compare import Comparison, OutputMetrics

    def with_error(err: float) -> Report:
        r = _report(2.0)
        r.results[1].max_abs = err
        r.results[1].comparison = Comparison(True, "", [OutputMetrics("y", max_abs=err, atol=1e-4)], 3)
        return r

    base = baseline_from(with_error(2e-5))
    assert not any(c.failed for c in check(base, with_error(8e-5)))  # grew, but within its tolerance
    (ort,) = [c for c in check(base, with_error(3e-4)) if c.key.startswith("onnxruntime")]
    assert ort.failed and "grew past 1.0e-04" in ort.accuracy


@pytest.mark.parametrize("bad", ["nan", "-1", "5", "0"])
def test_floors_outside_zero_one_are_input_errors(bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.json").write_text(_report(2.0).to_json())
    (tmp_path / "b.json").write_text(json.dumps(BASE))
    assert main(["check", str(tmp_path / "r.json"), "--baseline", str(tmp_path / "b.json"), "--floor", bad]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


def test_another_models_report_and_nan_speedups_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "b.json").write_text(json.dumps(BASE))
    (tmp_path / "other.json").write_text(_with(_report(2.0), name="minilm-l6", graph_hash="fff").to_json())
    argv = ["check", str(tmp_path / "other.json"), "--baseline", str(tmp_path / "b.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model 'tiny-bert' vs 'minilm-l6'" in err and "graph_hash 'abc' vs 'fff'" in err and "Traceback" not in err
    assert main([*argv, "--allow-different-model"]) == 0
    nan = _report(float("nan"))
    (tmp_path / "nan.json").write_text(nan.to_json())
    assert main(["check", str(tmp_path / "nan.json"), "--baseline", str(tmp_path / "b.json")]) == 2
    assert "non-finite speedup" in capsys.readouterr().err
    with pytest.raises(InputError, match="not a number"):
        baseline_from(nan)


@pytest.mark.parametrize("text", ['[1, 2]', '{"kind": "kiln-baseline", "schema_version": 2, "entries": {"a|b|c": 1}}',
                                  '{"kind": "kiln-baseline", "schema_version": 2, "entries": {"x": {"status": "ok"}}}',
                                  '{"kind": "kiln-baseline", "schema_version": 1, "entries": {}}', "{trunc"])
def test_malformed_baselines_are_input_errors(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.json").write_text(_report(2.0).to_json())
    (tmp_path / "b.json").write_text(text)
    assert main(["check", str(tmp_path / "r.json"), "--baseline", str(tmp_path / "b.json")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_directory_holds_one_baseline_per_host_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    here = _report(2.0)
    here.environment["host"] = "zen5-avx512"
    (tmp_path / "r.json").write_text(here.to_json())
    base_dir = tmp_path / "baselines"
    base_dir.mkdir()
    assert main(["check", str(tmp_path / "r.json"), "--baseline", str(base_dir), "--update-baseline"]) == 0
    assert (base_dir / "zen5-avx512.json").is_file()
    slow = _report(1.0)
    slow.environment["host"] = "zen5-avx512"
    (tmp_path / "slow.json").write_text(slow.to_json())
    assert main(["check", str(tmp_path / "slow.json"), "--baseline", str(base_dir)]) == 1  # its own host kind: gated
    slow.environment["host"] = "zen3-avx2"
    (tmp_path / "slow.json").write_text(slow.to_json())
    capsys.readouterr()
    assert main(["check", str(tmp_path / "slow.json"), "--baseline", str(base_dir)]) == 0  # another kind: accuracy only
    assert "Speed is not gated" in capsys.readouterr().out
    broken = _report(2.0, status="failed")
    broken.environment["host"] = "zen3-avx2"
    (tmp_path / "broken.json").write_text(broken.to_json())
    assert main(["check", str(tmp_path / "broken.json"), "--baseline", str(base_dir)]) == 1  # accuracy still gated


def test_a_report_column_is_one_record(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Markdown and CSV iterate one column list per workload: a column added from here shows in both."""
    import csv

    from pipeline import report as report_module
    from pipeline.report import COLUMNS, Column

    monkeypatch.setitem(COLUMNS, "forward", [*COLUMNS["forward"], Column("half speedup", lambda r: r.speedup.value / 2
                                                                           if r.speedup else None, ".3f")])
    r = _report(2.0)
    assert "| half speedup |" in r.to_markdown() and "| 1.000 |" in r.to_markdown()
    rows = list(csv.DictReader(r.to_csv().splitlines()))
    assert [row["half_speedup"] for row in rows] == ["0.5", "1.0"] and set(rows[0]) == {c.csv_name for c in COLUMNS["forward"]}
    assert report_module.Report.from_dict(r.to_dict()).mode == "forward"
    with pytest.raises(InputError, match="report mode 'train'"):
        report_module.Report.from_dict({**r.to_dict(), "mode": "train"})
