"""Typed results; JSON round-trip, Markdown, CSV; written whole or not at all."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .bench import Speedup, Timing
from .compare import Comparison
from .errors import InputError
from .fsutil import atomic_write
from .inputs import Shape
from .plot import bars_png
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
    metrics: dict[str, Any] = field(default_factory=dict)  # what only its workload measures (generation: tokens/s, prefill)

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
    """One run of one workload (`mode`: "forward" or "generate"): a row per engine and shape."""

    model: dict[str, Any]
    environment: dict[str, Any]
    config: dict[str, Any]
    results: list[Result]
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    mode: str = "forward"

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "mode": self.mode, "created": self.created, "environment": self.environment,
                "model": self.model, "config": self.config, "results": [r.to_dict() for r in self.results]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"report schema_version {d.get('schema_version')!r}; this Kiln reads {SCHEMA_VERSION}")
        if d.get("mode", "forward") not in COLUMNS:
            raise InputError(f"report mode {d.get('mode')!r}; this Kiln reads {', '.join(COLUMNS)}")
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
                   results=results, mode=d.get("mode", "forward"))

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
        m, c, env = self.model, self.config, self.environment
        lines = [f"# Kiln {'generation ' if self.mode == 'generate' else ''}report: {m.get('name')}", "",
                 f"graph `{m.get('graph_hash')}` · {m.get('parameters', 0) / 1e6:.1f} M params · "
                 f"device {env.get('gpu') or env.get('cpu')} · {env.get('torch_threads')} threads · "
                 f"torch {env.get('versions', {}).get('torch')} · isolation {c.get('isolation', 'none')}", ""]
        if self.mode == "generate":
            lines += [f"{c.get('new_tokens')} new tokens, greedy · static cache of {c.get('cache_len')} positions · "
                      f"{c.get('rounds')} rounds; speedup: decode tokens/s over eager fp32's", ""]
        if c.get("bandwidth_gb_s"):
            lines += [f"memory bandwidth {c['bandwidth_gb_s']:.1f} GB/s (a {c['bandwidth_probe_mb']} MB copy): reading every "
                      f"weight once per token bounds batch-1 decoding at {c['ceiling_tokens_per_s']:.1f} tokens/s", ""]
        harness = env.get("harness") or {}
        if harness.get("noop_ms"):
            noop = "; ".join(f"{shape}: " + ", ".join(f"{ms:.3f} ms {where}" for where, ms in by.items())
                             for shape, by in harness["noop_ms"].items())
            lines += [f"harness: {harness.get('allocator')}; an empty call, timed the same way, {noop}", ""]
        if self.noisy:
            lines += [f"**Speed not judged: the machine was busy.** {self.noisy}. The ratios below are what was measured, "
                      f"not the engines' speedups; run again on a quiet machine.", ""]
        lines += [_table(COLUMNS[self.mode], self.results, bool(self.noisy)), ""]
        if picture:
            lines += [f"![speedup over eager fp32 with 95% intervals]({picture})", ""]
        notes = [r for r in self.results if r.reason]
        if notes:
            lines += ["## Reasons", ""] + [f"- **{r.backend} {r.precision} {r.shape}** ({r.status}): {r.reason}" for r in notes] + [""]
        return "\n".join(lines)

    def to_csv(self) -> str:
        """Every column of the report's workload, unformatted, a row per result."""
        columns = COLUMNS[self.mode]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([c.csv_name for c in columns])
        for r in self.results:
            w.writerow([c.value(r) for c in columns])
        return buf.getvalue()

    def to_png(self) -> bytes | None:
        """One bar per row its workload's plot measures (PLOTS), with its 95% interval; None when
        no row was timed."""
        plot = PLOTS[self.mode]
        rows = [(r, v, ci) for r in self.results if (v := plot.value(r)) is not None and (ci := plot.ci(r))]
        return bars_png([f"{r.backend} {r.precision.value} {r.shape}" for r, _, _ in rows], [v for _, v, _ in rows],
                        [ci for _, _, ci in rows], [r.status == "ok" for r, _, _ in rows], plot.title,
                        f"{self.model.get('name')} on {self.environment.get('gpu') or self.environment.get('cpu')}", ref=plot.ref)

    def save(self, out_dir: str | Path) -> list[Path]:
        """report.json, report.md, report.csv and, once rows are timed, report.png (linked from
        report.md), each replaced atomically; JSON last, as the file of record."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        png = self.to_png()
        written = [atomic_write(out / "report.png", png)] if png else []
        written += [atomic_write(out / "report.md", self.to_markdown("report.png" if png else None)),
                    atomic_write(out / "report.csv", self.to_csv())]
        return [*written, atomic_write(out / "report.json", self.to_json())]


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    if fmt == "x":  # a ratio
        return f"{value:.2f}x"
    return value if isinstance(value, str) else format(value, fmt)


@dataclass(frozen=True)
class Column:
    """A report column: Markdown shows `cell` (or `value` formatted with `fmt`) under `header`,
    CSV writes `value` under `csv_name`. `csv_only`: a raw number Markdown folds into another cell;
    `optional`: left out of Markdown when no row has a value."""

    header: str
    value: Callable[[Result], Any]
    fmt: str = "s"
    csv: str = ""
    cell: Callable[[Result, bool], str] | None = None
    csv_only: bool = False
    optional: bool = False

    @property
    def csv_name(self) -> str:
        return self.csv or self.header.replace(" ", "_").replace("/", "_per_")

    def text(self, r: Result, noisy: bool) -> str:
        return self.cell(r, noisy) if self.cell else _cell(self.value(r), self.fmt)


def _lat(q: str) -> Callable[[Result], float | None]:
    return lambda r: getattr(r.latency_ms, q) if r.latency_ms else None


def _metric(key: str, scale: int = 1) -> Callable[[Result], Any]:
    return lambda r: r.metrics.get(key) if scale == 1 or r.metrics.get(key) is None else r.metrics[key] / scale


def _speedup_cell(r: Result, noisy: bool) -> str:
    sp = r.speedup
    if sp and noisy and not (r.backend == "eager" and r.precision.value == "fp32"):
        return f"noisy ({sp.value:.2f}x as measured)"
    return f"{sp.value:.2f}x ({sp.ci_low:.2f}-{sp.ci_high:.2f})" if sp else "–"


def _agreement_cell(r: Result, _noisy: bool) -> str:
    return ", ".join(([f"{r.agreement:.0%} {r.agreement_kind}"] if r.agreement is not None else []) +
                     ([f"emb cos {r.embedding_cosine:.4f}"] if r.embedding_cosine is not None else [])) or "–"


def _divergence(r: Result) -> int | str | None:
    first = r.metrics.get("first_divergence")
    return "none" if r.status == "ok" and first is None and r.agreement is not None else first


_KEY = [Column("backend", lambda r: r.backend), Column("precision", lambda r: r.precision.value),
        Column("shape", lambda r: str(r.shape)), Column("status", lambda r: r.status)]
_SPEEDUP = [Column("speedup ci low", lambda r: r.speedup.ci_low if r.speedup else None, csv_only=True),
            Column("speedup ci high", lambda r: r.speedup.ci_high if r.speedup else None, csv_only=True)]
_TAIL = [Column("compile s", lambda r: r.compile_s, ".1f"),
         Column("peak MB", lambda r: r.peak_host_mb if r.peak_device_mb is None else r.peak_device_mb, ".0f", csv="peak_mb"),
         Column("reason", lambda r: r.reason, csv_only=True)]

# Each workload's columns: report.md, report.csv and the checks on them iterate these lists, so a
# column is one entry here (tests/ may append one for a workload of its own).
COLUMNS: dict[str, list[Column]] = {
    "forward": [
        *_KEY, Column("max abs err", lambda r: r.max_abs, ".1e", csv="max_abs"), Column("cosine", lambda r: r.cosine, ".6f"),
        Column("agreement", lambda r: r.agreement, cell=_agreement_cell), Column("agreement kind", lambda r: r.agreement_kind, csv_only=True),
        Column("embedding cosine", lambda r: r.embedding_cosine, csv_only=True), Column("verdict", lambda r: r.verdict),
        Column("median ms", _lat("median"), ".2f"), Column("p90 ms", _lat("p90"), ".2f"), Column("p95 ms", _lat("p95"), csv_only=True),
        Column("p99 ms", _lat("p99"), ".2f"), Column("mean ms", _lat("mean"), csv_only=True), Column("stdev ms", _lat("stdev"), csv_only=True),
        Column("samples/s", lambda r: r.throughput["samples_per_s"] if r.throughput else None, ".1f", csv="samples_per_s"),
        Column("tokens/s", lambda r: r.throughput["tokens_per_s"] if r.throughput else None, csv="tokens_per_s", csv_only=True),
        Column("speedup (95% CI)", lambda r: r.speedup.value if r.speedup else None, csv="speedup", cell=_speedup_cell), *_SPEEDUP,
        *_TAIL[:2], Column("engine", lambda r: r.engine or None),
        Column("artifact MB", lambda r: r.artifact_mb, ".1f", optional=True), _TAIL[2]],
    "generate": [
        *_KEY, Column("tokens", _metric("new_tokens"), "d"), Column("agreement", lambda r: r.agreement, ".0%"),
        Column("first divergence", _divergence, "d"), Column("max logits err", lambda r: r.max_abs, ".1e"),
        Column("prefill ms", _metric("prefill_ms"), ".2f"), Column("decode ms p50", _lat("median"), ".2f"),
        Column("p90", _lat("p90"), ".2f"), Column("p99", _lat("p99"), ".2f"),
        Column("decode tok/s", _metric("decode_tokens_per_s"), ".1f"), Column("e2e tok/s", _metric("e2e_tokens_per_s"), ".1f"),
        Column("decode speedup", lambda r: r.speedup.value if r.speedup else None, "x"), *_SPEEDUP,
        Column("decode tokens/s ci low", lambda r: (r.metrics.get("decode_tokens_per_s_ci") or [None])[0], csv_only=True),
        Column("decode tokens/s ci high", lambda r: (r.metrics.get("decode_tokens_per_s_ci") or [None, None])[1], csv_only=True),
        Column("cache MB", _metric("cache_bytes", 2**20), ".1f"), *_TAIL],
}


@dataclass(frozen=True)
class Plot:
    """What report.png draws for a workload: one bar per row with a `value` and its interval `ci`."""

    value: Callable[[Result], float | None]
    ci: Callable[[Result], list[float] | None]
    title: str
    ref: float | None = None  # a line across the bars (1.0: as fast as the reference)


PLOTS: dict[str, Plot] = {
    "forward": Plot(lambda r: r.speedup.value if r.speedup and not (r.backend == "eager" and r.precision.value == "fp32") else None,
                    lambda r: [r.speedup.ci_low, r.speedup.ci_high] if r.speedup else None,
                    "speedup over eager fp32, same run (bars: 95% interval; red: not a pass)", ref=1.0),
    "generate": Plot(_metric("decode_tokens_per_s"), _metric("decode_tokens_per_s_ci"),
                     "decode tokens/s (bars: 95% interval; red: not a pass)"),
}


def _table(columns: list[Column], results: list[Result], noisy: bool = False) -> str:
    shown = [c for c in columns if not c.csv_only and not (c.optional and all(c.value(r) is None for r in results))]
    out = ["| " + " | ".join(c.header for c in shown) + " |", "|" + "---|" * len(shown)]
    out += ["| " + " | ".join(c.text(r, noisy) for c in shown) + " |" for r in results]
    return "\n".join(out)
