"""The CI regression gate: a run's report against a committed baseline, per (backend, precision, shape).

Accuracy must not get worse. The speedup over eager (a ratio from one run, so it holds across
machines of one kind) must not drop by more than a threshold that grows with the run's own noise:
max(floor, relative half-width of the baseline's 95% interval + the current one's).
Exit codes: 0 pass, 1 regression, 2 bad input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .fsutil import atomic_write
from .report import Report, Result

BASELINE_KIND = "kiln-baseline"
_RANK = {"ok": 3, "mismatch": 1, "failed": 0, "unsupported": -1, "unavailable": -1}


@dataclass
class Check:
    key: str
    outcome: str  # pass | regression | new
    accuracy: str
    speed: str

    @property
    def failed(self) -> bool:
        return self.outcome == "regression"


def _entry(r: Result) -> dict[str, Any]:
    sp = r.speedup
    return {"status": r.status, "verdict": r.verdict, "max_abs": r.max_abs, "speedup": sp.value if sp else None,
            "ci": [sp.ci_low, sp.ci_high] if sp else None}


def baseline_from(report: Report) -> dict[str, Any]:
    return {"kind": BASELINE_KIND, "schema_version": 1, "model": report.model.get("name"),
            "graph_hash": report.model.get("graph_hash"), "environment": {k: report.environment.get(k) for k in ("cpu", "gpu", "device", "torch_threads")},
            "entries": {f"{r.backend}|{r.precision}|{r.shape}": _entry(r) for r in report.results}}


def load_baseline(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read baseline {path}: {e}") from e
    if not isinstance(data, dict) or data.get("kind") != BASELINE_KIND or not isinstance(data.get("entries"), dict):
        raise InputError(f"{path} is not a Kiln baseline (write one with --update-baseline)")
    return data


def _rel_halfwidth(value: float | None, ci: list[float | None] | None) -> float:
    if not value or not ci or ci[0] is None or ci[1] is None:
        return 0.0
    return (ci[1] - ci[0]) / 2 / value


def check(baseline: dict[str, Any], report: Report, floor: float = 0.10) -> list[Check]:
    current = baseline_from(report)["entries"]
    checks = []
    for key, base in baseline["entries"].items():
        now = current.get(key)
        if now is None:
            checks.append(Check(key, "regression", "missing from the report", "–"))
            continue
        acc_bad = _RANK.get(now["status"], 0) < _RANK.get(base["status"], 0)
        accuracy = (f"{base['status']} → {now['status']}" + (" (worse)" if acc_bad else ""))
        speed, speed_bad = "–", False
        if base.get("speedup") and now.get("speedup"):
            thr = max(floor, _rel_halfwidth(base["speedup"], base.get("ci")) + _rel_halfwidth(now["speedup"], now.get("ci")))
            change = now["speedup"] / base["speedup"] - 1
            speed_bad = change < -thr
            speed = f"{base['speedup']:.2f}x → {now['speedup']:.2f}x ({change:+.0%}, allowed -{thr:.0%})"
        elif base.get("speedup") and not now.get("speedup"):
            speed, speed_bad = f"{base['speedup']:.2f}x → not measured", True
        checks.append(Check(key, "regression" if acc_bad or speed_bad else "pass", accuracy, speed))
    for key in current.keys() - baseline["entries"].keys():
        checks.append(Check(key, "new", current[key]["status"], "–"))
    return checks


def summary(checks: list[Check], floor: float) -> str:
    bad = [c for c in checks if c.failed]
    head = f"## Kiln regression gate: {'FAIL' if bad else 'pass'} ({len(bad)} regression(s) in {len(checks)} rows)"
    lines = [head, "", f"Speedup may drop by max({floor:.0%}, the two runs' 95% interval half-widths added); accuracy may not get worse.", "",
             "| backend | precision | shape | outcome | accuracy | speedup vs eager |", "|---|---|---|---|---|---|"]
    for c in sorted(checks, key=lambda c: (not c.failed, c.key)):
        b, p, s = c.key.split("|")
        lines.append(f"| {b} | {p} | {s} | {'**regression**' if c.failed else c.outcome} | {c.accuracy} | {c.speed} |")
    return "\n".join(lines) + "\n"


def update_baseline(report: Report, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(p, json.dumps(baseline_from(report), indent=2) + "\n")
