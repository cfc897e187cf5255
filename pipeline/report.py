"""Typed results; JSON round-trip, Markdown, CSV; written whole or not at all."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .bench import Speedup, Timing
from .compare import Comparison
from .errors import InputError
from .fsutil import atomic_write
from .inputs import Shape
from .precision import Precision

SCHEMA_VERSION = 1
STATUSES = ("ok", "mismatch", "failed", "unsupported", "unavailable")
_TYPED = {"latency_ms": Timing, "speedup": Speedup, "comparison": Comparison}


@dataclass
class Result:
    backend: str
    precision: Precision
    shape: Shape
    status: str
    reason: str = ""
    verdict: str | None = None          # "pass" | "fail" | None when nothing was compared
    max_abs: float | None = None
    cosine: float | None = None
    agreement: float | None = None
    agreement_kind: str | None = None
    embedding_cosine: float | None = None  # encoders: mean-pooled sentence embeddings vs eager fp32, min over rows
    latency_ms: Timing | None = None
    speedup: Speedup | None = None      # against eager fp32 in this run
    compile_s: float | None = None      # build + first call (cold)
    peak_host_mb: float | None = None
    peak_device_mb: float | None = None
    comparison: Comparison | None = None
    describe: dict[str, Any] = field(default_factory=dict)
    engine: str = ""                    # which engine was checked and timed: as compiled, or its saved files
    crashed: bool = False               # its worker process died (a signal, OOM, a timeout)
    artifact_mb: float | None = None    # the saved engine's files, where it was saved

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")
        self.precision = Precision.parse(self.precision)
        self.shape = self.shape if isinstance(self.shape, Shape) else Shape.parse(str(self.shape))

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.backend, self.precision.value, str(self.shape))

    @property
    def throughput(self) -> dict[str, float | None] | None:
        """Samples and tokens (batch x seq) per second at the median latency."""
        if self.latency_ms is None or not self.latency_ms.median > 0:
            return None
        per_s = 1000.0 / self.latency_ms.median
        return {"samples_per_s": self.shape.batch * per_s,
                "tokens_per_s": self.shape.batch * self.shape.seq * per_s if self.shape.seq else None}  # images have no tokens

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(precision=self.precision.value, shape=str(self.shape))
        for name in _TYPED:
            out[name] = out[name].to_dict() if out[name] is not None else None
        out["throughput"] = self.throughput  # derived: from_dict ignores it
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        for name, typ in _TYPED.items():
            if values.get(name) is not None:
                values[name] = typ.from_dict(values[name])  # type: ignore[attr-defined]
        return cls(**values)


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
                "model": self.model, "config": self.config, "results": [r.to_dict() for r in self.results]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"report schema_version {d.get('schema_version')!r}; this Kiln reads {SCHEMA_VERSION}")
        for key, kind in (("model", dict), ("environment", dict), ("results", list)):
            if not isinstance(d.get(key), kind):
                raise InputError(f"the report's {key!r} is {type(d.get(key)).__name__}, not a {kind.__name__}")
        results = []
        for i, r in enumerate(d["results"]):
            try:
                results.append(Result.from_dict(r))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise InputError(f"the report's results[{i}] is malformed ({type(e).__name__}: {e})") from None
        return cls(model=d["model"], environment=d["environment"], config=d.get("config", {}), created=d.get("created", ""),
                   results=results)

    @classmethod
    def load(cls, path: str | Path) -> Report:
        try:
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a report is a JSON object, this is a {type(data).__name__}")
            return cls.from_dict(data)
        except InputError as e:
            raise InputError(f"cannot read report {path}: {e}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"cannot read report {path}: {e}") from e

    @property
    def noisy(self) -> str | None:
        """Why this report's timing cannot be trusted (pipeline.contention); None on a quiet machine."""
        reading = self.environment.get("contention")
        return reading.get("noisy") if isinstance(reading, dict) else None

    def find(self, backend: str, precision: str | Precision, shape: str | Shape) -> Result | None:
        key = (backend, Precision.parse(precision).value, str(shape))
        return next((r for r in self.results if r.key == key), None)

    def rows(self, backend: str, precision: str | Precision) -> list[Result]:
        """Every shape's row of one engine, in the run's shape order."""
        p = Precision.parse(precision)
        return [r for r in self.results if r.backend == backend and r.precision == p]

    def to_markdown(self, picture: str | None = None) -> str:
        """The table and every row's reason; `picture`: a speedup chart beside it to link."""
        m = self.model
        lines = [f"# Kiln report: {m.get('name')}", "",
                 f"graph `{m.get('graph_hash')}` · {m.get('parameters', 0) / 1e6:.1f} M params · "
                 f"device {self.environment.get('gpu') or self.environment.get('cpu')} · "
                 f"{self.environment.get('torch_threads')} threads · torch {self.environment.get('versions', {}).get('torch')} · "
                 f"isolation {self.config.get('isolation', 'none')}", ""]
        if self.noisy:
            lines += [f"**Speed not judged: the machine was busy.** {self.noisy}. The ratios below are what was measured, "
                      f"not the engines' speedups; run again on a quiet machine.", ""]
        lines += [_table(self.results, bool(self.noisy)), ""]
        if picture:
            lines += [f"![speedup over eager fp32 with 95% intervals]({picture})", ""]
        notes = [r for r in self.results if r.reason]
        if notes:
            lines += ["## Reasons", ""] + [f"- **{r.backend} {r.precision} {r.shape}** ({r.status}): {r.reason}" for r in notes] + [""]
        return "\n".join(lines)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["backend", "precision", "shape", "status", "verdict", "max_abs", "cosine", "agreement",
                    "median_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "stdev_ms", "samples_per_s", "tokens_per_s",
                    "speedup", "speedup_ci_low", "speedup_ci_high", "compile_s", "peak_host_mb",
                    "embedding_cosine", "artifact_mb", "reason"])
        for r in self.results:
            lat, sp = r.latency_ms, r.speedup
            w.writerow([r.backend, r.precision, r.shape, r.status, r.verdict, r.max_abs, r.cosine, r.agreement,
                        lat.median if lat else None, lat.p90 if lat else None, lat.p95 if lat else None,
                        lat.p99 if lat else None, lat.mean if lat else None, lat.stdev if lat else None,
                        r.throughput["samples_per_s"] if r.throughput else None,
                        r.throughput["tokens_per_s"] if r.throughput else None, sp.value if sp else None,
                        sp.ci_low if sp else None, sp.ci_high if sp else None, r.compile_s, r.peak_host_mb,
                        r.embedding_cosine, r.artifact_mb, r.reason])
        return buf.getvalue()

    def save(self, out_dir: str | Path) -> list[Path]:
        """report.json, report.md, report.csv and, once rows are timed, report.png (linked from
        report.md), each replaced atomically; JSON last, as the file of record."""
        from .plot import speedup_png

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        png = speedup_png(self)
        written = [atomic_write(out / "report.png", png)] if png else []
        written += [atomic_write(out / "report.md", self.to_markdown("report.png" if png else None)),
                    atomic_write(out / "report.csv", self.to_csv())]
        return [*written, atomic_write(out / "report.json", self.to_json())]


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _table(results: list[Result], noisy: bool = False) -> str:
    head = ["backend", "precision", "shape", "status", "max abs err", "cosine", "agreement", "verdict",
            "median ms", "p90 ms", "p99 ms", "samples/s", "speedup (95% CI)", "compile s", "peak MB", "engine"]
    sized = any(r.artifact_mb is not None for r in results)
    if sized:
        head.append("artifact MB")
    rows = []
    for r in results:
        lat, sp = r.latency_ms, r.speedup
        speed = f"{sp.value:.2f}x ({sp.ci_low:.2f}-{sp.ci_high:.2f})" if sp else "–"
        if sp and noisy and not (r.backend == "eager" and r.precision.value == "fp32"):
            speed = f"noisy ({sp.value:.2f}x as measured)"
        agree = ", ".join(([f"{r.agreement:.0%} {r.agreement_kind}"] if r.agreement is not None else []) +
                          ([f"emb cos {r.embedding_cosine:.4f}"] if r.embedding_cosine is not None else [])) or "–"
        rows.append([r.backend, r.precision.value, str(r.shape), r.status, _fmt(r.max_abs, ".1e"), _fmt(r.cosine, ".6f"), agree,
                     r.verdict or "–", _fmt(lat.median if lat else None, ".2f"), _fmt(lat.p90 if lat else None, ".2f"),
                     _fmt(lat.p99 if lat else None, ".2f"), _fmt(r.throughput["samples_per_s"] if r.throughput else None, ".1f"), speed,
                     _fmt(r.compile_s, ".1f"), _fmt(r.peak_host_mb if r.peak_device_mb is None else r.peak_device_mb, ".0f"),
                     r.engine or "–"] + ([_fmt(r.artifact_mb, ".1f")] if sized else []))
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)
