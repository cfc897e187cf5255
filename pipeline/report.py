"""Typed results; JSON round-trip, Markdown, CSV; written whole or not at all."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "mismatch", "failed", "unsupported", "unavailable")


@dataclass
class Result:
    backend: str
    precision: str
    shape: str
    status: str
    reason: str = ""
    verdict: str | None = None          # "pass" | "fail" | None when nothing was compared
    max_abs: float | None = None
    cosine: float | None = None
    agreement: float | None = None
    agreement_kind: str | None = None
    latency_ms: dict[str, Any] | None = None   # median, p90, iqr, samples
    speedup: dict[str, float] | None = None    # value, ci_low, ci_high, against eager fp32 in this run
    compile_s: float | None = None             # build + first call (cold)
    peak_host_mb: float | None = None
    peak_device_mb: float | None = None
    comparison: dict[str, Any] | None = None
    describe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.backend, self.precision, self.shape)


@dataclass
class Report:
    model: dict[str, Any]
    environment: dict[str, Any]
    config: dict[str, Any]
    results: list[Result]
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "created": self.created, "environment": self.environment,
                "model": self.model, "config": self.config, "results": [asdict(r) for r in self.results]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        from .errors import InputError

        if d.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"report schema_version {d.get('schema_version')!r}; this Kiln reads {SCHEMA_VERSION}")
        names = {f.name for f in fields(Result)}
        return cls(model=d["model"], environment=d["environment"], config=d.get("config", {}), created=d.get("created", ""),
                   results=[Result(**{k: v for k, v in r.items() if k in names}) for r in d["results"]])

    @classmethod
    def load(cls, path: str | Path) -> Report:
        from .errors import InputError

        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"cannot read report {path}: {e}") from e

    def find(self, backend: str, precision: str, shape: str) -> Result | None:
        return next((r for r in self.results if r.key == (backend, precision, shape)), None)

    def to_markdown(self) -> str:
        m = self.model
        lines = [f"# Kiln report: {m.get('name')}", "",
                 f"graph `{m.get('graph_hash')}` · {m.get('parameters', 0) / 1e6:.1f} M params · "
                 f"device {self.environment.get('gpu') or self.environment.get('cpu')} · "
                 f"{self.environment.get('torch_threads')} threads · torch {self.environment.get('versions', {}).get('torch')}", "",
                 _table(self.results), ""]
        notes = [r for r in self.results if r.reason]
        if notes:
            lines += ["## Reasons", ""] + [f"- **{r.backend} {r.precision} {r.shape}** ({r.status}): {r.reason}" for r in notes] + [""]
        return "\n".join(lines)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["backend", "precision", "shape", "status", "verdict", "max_abs", "cosine", "agreement",
                    "median_ms", "p90_ms", "speedup", "speedup_ci_low", "speedup_ci_high", "compile_s", "peak_host_mb", "reason"])
        for r in self.results:
            lat, sp = r.latency_ms or {}, r.speedup or {}
            w.writerow([r.backend, r.precision, r.shape, r.status, r.verdict, r.max_abs, r.cosine, r.agreement,
                        lat.get("median"), lat.get("p90"), sp.get("value"), sp.get("ci_low"), sp.get("ci_high"),
                        r.compile_s, r.peak_host_mb, r.reason])
        return buf.getvalue()

    def save(self, out_dir: str | Path) -> list[Path]:
        """report.json, report.md and report.csv, each replaced atomically; JSON last, as the file of record."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [atomic_write(out / "report.md", self.to_markdown()), atomic_write(out / "report.csv", self.to_csv())]
        return [*written, atomic_write(out / "report.json", self.to_json())]


def atomic_write(path: Path, text: str | bytes) -> Path:
    """Write to a temporary file beside `path`, fsync, then rename: readers see the old file or the new, never half."""
    data = text.encode() if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """The directory twin of atomic_write: build into a hidden directory beside `final`, then
    rename it into place whole. If another process got there first, theirs is kept; on an
    error nothing is left behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _table(results: list[Result]) -> str:
    head = ["backend", "precision", "shape", "status", "max abs err", "cosine", "agreement", "verdict",
            "median ms", "p90 ms", "speedup (95% CI)", "compile s", "peak MB"]
    rows = []
    for r in results:
        lat, sp = r.latency_ms or {}, r.speedup
        speed = f"{sp['value']:.2f}x ({sp['ci_low']:.2f}-{sp['ci_high']:.2f})" if sp else "–"
        agree = f"{r.agreement:.0%} {r.agreement_kind}" if r.agreement is not None else "–"
        rows.append([r.backend, r.precision, r.shape, r.status, _fmt(r.max_abs, ".1e"), _fmt(r.cosine, ".6f"), agree,
                     r.verdict or "–", _fmt(lat.get("median"), ".2f"), _fmt(lat.get("p90"), ".2f"), speed,
                     _fmt(r.compile_s, ".1f"), _fmt(r.peak_host_mb if r.peak_device_mb is None else r.peak_device_mb, ".0f")])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)
