"""The CI regression gate: a run's report against a committed baseline, per (backend, precision, shape),
for either workload (a generation report's speedup is decode tokens/s over eager fp32's, its
accuracy the greedy tokens: a divergence at fp32 is a mismatch).

Accuracy must not get worse: a row's status may not drop (ok > mismatch > failed), and its max abs
error may not grow past both its tolerance and the baseline's own error. The speedup over eager
(a ratio from one run) must not drop by more than a threshold: the floor, widened by the two
runs' 95% intervals by at most WIDEN_CAP. A report of another model, graph, device kind or
precision set is refused: it would compare unrelated rows.

Speed ratios differ between kinds of CPU host (one backend may use AMX or AVX-512 where another
does not), so a baseline belongs to a host kind (`environment.host`). `--baseline` may name a
directory of baselines, one `<host>.json` per host kind; a host kind without one is gated on
accuracy only, and the summary says so.
Exit codes: 0 pass, 1 regression, 2 bad input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from .errors import InputError
from .fsutil import atomic_write
from .report import Report, Result

BASELINE_KIND, BASELINE_SCHEMA = "kiln-baseline", 2
WIDEN_CAP = 0.20  # the most the runs' own noise may add to the allowed speedup drop
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


def _finite(x: Any) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _entry(r: Result) -> dict[str, Any]:
    sp = r.speedup
    atol = max((o.atol for o in r.comparison.outputs), default=None) if r.comparison else None
    return {"status": r.status, "verdict": r.verdict, "max_abs": r.max_abs, "atol": atol,
            "speedup": sp.value if sp else None, "ci": [sp.ci_low, sp.ci_high] if sp else None}


def _identity(report: Report) -> dict[str, Any]:
    return {"mode": report.mode, "model": report.model.get("name"), "graph_hash": report.model.get("graph_hash"),
            "device_kind": str(report.environment.get("device", "cpu")).split(":")[0],
            "precisions": sorted({r.precision.value for r in report.results})}


def baseline_from(report: Report) -> dict[str, Any]:
    if report.noisy:
        raise InputError(f"the report was timed on a busy machine ({report.noisy}): its ratios are not a baseline; "
                         f"run it again on a quiet one")
    for r in report.results:
        if r.speedup is not None and not _finite(r.speedup.value):
            raise InputError(f"{r.backend} {r.precision} {r.shape}: speedup {r.speedup.value} is not a number; not a baseline")
    return {"kind": BASELINE_KIND, "schema_version": BASELINE_SCHEMA, **_identity(report), "host": report.environment.get("host"),
            "environment": {k: report.environment.get(k) for k in ("cpu", "gpu", "device", "torch_threads")},
            "entries": {f"{r.backend}|{r.precision}|{r.shape}": _entry(r) for r in report.results}}


def baseline_path(where: str | Path, report: Report) -> Path:
    """`where` itself, or, for a directory (one that exists, or a new path not ending in .json), the
    baseline of the report's host kind in it."""
    p = Path(where)
    directory = p.is_dir() or (not p.exists() and p.suffix != ".json")
    return p / f"{report.environment.get('host') or 'unknown-host'}.json" if directory else p


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read baseline {path}: {e}") from e
    if isinstance(data, dict) and "kind" not in data and isinstance(data.get("results"), list):
        return baseline_from(Report.load(path))  # a report taken as the baseline, as --update-baseline would write it
    if not isinstance(data, dict) or data.get("kind") != BASELINE_KIND or not isinstance(data.get("entries"), dict):
        raise InputError(f"{path} is neither a Kiln baseline nor a report (write a baseline with "
                         f"kiln check REPORT --baseline DIR --update-baseline)")
    if data.get("schema_version") != BASELINE_SCHEMA:
        raise InputError(f"{path} has baseline schema {data.get('schema_version')!r}; this Kiln reads {BASELINE_SCHEMA}: "
                         f"write it again with --update-baseline")
    for key, entry in data["entries"].items():
        ok = (isinstance(entry, dict) and entry.get("status") in _RANK and key.count("|") == 2
              and (entry.get("speedup") is None or (_finite(entry["speedup"]) and entry["speedup"] > 0)))
        if not ok:
            raise InputError(f"{path}: malformed baseline entry {key!r}: {entry!r}")
    return data


def load_baseline(where: str | Path, report: Report) -> tuple[dict[str, Any], bool]:
    """(the baseline, whether speed is gated). A directory without this host kind's baseline gives
    one of the others, for accuracy only."""
    p = Path(where)
    if not p.is_dir():
        return _read(p), True
    own = baseline_path(p, report)
    if own.is_file():
        return _read(own), True
    others = sorted(p.glob("*.json"))
    if not others:
        raise InputError(f"{p} holds no baseline (write one with --update-baseline)")
    return _read(others[0]), False


def check(baseline: dict[str, Any], report: Report, floor: float = 0.10, *, speed: bool = True,
          allow_different_model: bool = False) -> list[Check]:
    """Every baseline row against the report's; speed is judged only with `speed` and a quiet report
    (each unjudged row says why)."""
    unjudged = "not judged: the machine was busy" if report.noisy else "not gated on this host kind"
    speed = speed and not report.noisy
    if not (_finite(floor) and 0 < floor < 1):
        raise InputError(f"--floor {floor}: the allowed speedup drop must be a fraction between 0 and 1, e.g. 0.10")
    mine = _identity(report)
    if not allow_different_model:
        theirs = {"mode": "forward", **baseline}  # a baseline written before generation was gated is a forward one
        differ = [f"{k} {theirs.get(k)!r} vs {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if differ:
            raise InputError("the report is not of what the baseline measured (" + "; ".join(differ) +
                             "): pass --allow-different-model to compare anyway")
    current = {f"{r.backend}|{r.precision}|{r.shape}": r for r in report.results}
    for key, r in current.items():
        if r.speedup is not None and not _finite(r.speedup.value):
            raise InputError(f"report row {key} has a non-finite speedup ({r.speedup.value}): the run is broken, not slower")
    checks = [_check_row(key, base, current.get(key), floor, speed, unjudged) for key, base in baseline["entries"].items()]
    checks += [Check(key, "new", current[key].status, "–") for key in current.keys() - baseline["entries"].keys()]
    return checks


def _check_row(key: str, base: dict[str, Any], now: Result | None, floor: float, speed: bool, unjudged: str) -> Check:
    if now is None:
        return Check(key, "regression", "missing from the report", "–")
    acc_bad = _RANK.get(now.status, 0) < _RANK[base["status"]]
    accuracy = f"{base['status']} → {now.status}" + (" (worse)" if acc_bad else "")
    bounds: list[float] = [x for x in (base.get("atol"), base.get("max_abs")) if _finite(x)]
    limit = max([*bounds, 0.0])
    if _finite(base.get("atol")) and now.max_abs is not None and now.max_abs > limit:
        acc_bad = True
        accuracy += f"; max abs {now.max_abs:.1e} grew past {limit:.1e} (tolerance, or the baseline's own error)"
    text, speed_bad = _speed(base, now, floor) if speed else (unjudged, False)
    return Check(key, "regression" if acc_bad or speed_bad else "pass", accuracy, text)


def _rel_halfwidth(value: float | None, ci: Any) -> float:
    if not value or not ci or not _finite(ci[0]) or not _finite(ci[1]):
        return 0.0
    return (ci[1] - ci[0]) / 2 / value


def _speed(base: dict[str, Any], now: Result, floor: float) -> tuple[str, bool]:
    b, sp = base.get("speedup"), now.speedup
    if b is None:
        return "–", False
    if sp is None:
        return f"{b:.2f}x → not measured", True
    noise = _rel_halfwidth(b, base.get("ci")) + _rel_halfwidth(sp.value, [sp.ci_low, sp.ci_high])
    thr = min(max(floor, noise), floor + WIDEN_CAP)
    change = sp.value / b - 1
    return f"{b:.2f}x → {sp.value:.2f}x ({change:+.0%}, allowed -{thr:.0%})", change < -thr


def note(report: Report, baseline: Mapping[str, Any], speed: bool, where: str | Path) -> str:
    """What the summary says beside its table when speed is not gated: no baseline of this host
    kind under `where` (accuracy is gated against another's), or a busy machine."""
    out = "" if speed else (f"Speed is not gated: {where} has no baseline for this host kind "
                            f"({report.environment.get('host')}); accuracy is gated against {baseline.get('host')}'s. "
                            f"Add one with --update-baseline on this host kind.")
    if report.noisy:
        out = f"Speed: not judged, machine busy ({report.noisy}); accuracy is gated. {out}".strip()
    return out


def summary(checks: list[Check], floor: float, note: str = "") -> str:
    bad = [c for c in checks if c.failed]
    head = f"## Kiln regression gate: {'FAIL' if bad else 'pass'} ({len(bad)} regression(s) in {len(checks)} rows)"
    lines = [head, "", f"Speedup may drop by max({floor:.0%}, the two runs' 95% interval half-widths added, at most "
             f"{floor + WIDEN_CAP:.0%}); accuracy may not get worse.", ""]
    if note:
        lines += [note, ""]
    lines += ["| backend | precision | shape | outcome | accuracy | speedup vs eager |", "|---|---|---|---|---|---|"]
    for c in sorted(checks, key=lambda c: (not c.failed, c.key)):
        b, p, s = c.key.split("|")
        lines.append(f"| {b} | {p} | {s} | {'**regression**' if c.failed else c.outcome} | {c.accuracy} | {c.speed} |")
    return "\n".join(lines) + "\n"


def update_baseline(report: Report, where: str | Path) -> Path:
    text = json.dumps(baseline_from(report), indent=2) + "\n"  # refused before anything is made
    p = baseline_path(where, report)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(p, text)
