"""The generate workload (`--mode generate`): every engine generates greedily from the same seeded
prompts, its tokens compared with eager fp32's step by step and its prefill, per-token decode and
end-to-end speed measured in interleaved rounds. A build ships a generation artifact, one directory
ROOT/<model>/<backend>-<precision>-generate/:

    prefill/   the prefill step, an engine directory as `kiln build` writes one (files + manifest.json)
    decode/    the decode step, likewise
    reference.pt         the build's seeded prompts and eager fp32's greedy tokens from them, per shape
    tokenizer files      when the model has a tokenizer
    manifest.json        mode "generate": the cache's geometry, both steps, the verdict and the speed,
                         and the sha256 of every file above, the steps' own manifests included

What ships is what was checked and timed: both steps are saved, loaded back from their files in a
fresh worker, generate from every built shape's prompts with the tokens compared to eager fp32's,
and are timed against eager in interleaved rounds, as forward engines are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import backends as registry

from . import manifest, store
from .bench import speedup
from .config import REFERENCE
from .decoding import AGREEMENT_MARGIN, Generation
from .env import device_info, environment, version
from .fsutil import digest
from .generate import MODE, STEPS
from .genrun import Steps, judge, loaded_steps, memory_bandwidth, plan_cache, prompts, references, steps_engine, time_rounds
from .inputs import Shape
from .manifest import Manifest, ModelRecord, Verdict
from .precision import Precision
from .report import Result
from .worker import CompileRequest, RemoteEngine, loads_in_worker

if TYPE_CHECKING:
    from pathlib import Path

    from .workload import Context, Engine, Engines, Rows


@dataclass
class Accepted:
    """The saved steps, loaded back: their row at every shape, timed beside eager fp32's."""

    rows: dict[Shape, Result]
    reference: dict[Shape, Result] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.status == "ok" for r in self.rows.values())

    @property
    def reason(self) -> str:
        return "; ".join(f"at {s}: {r.reason}" for s, r in self.rows.items() if r.status != "ok")


class Generate:
    mode, suffix = MODE, "-generate"

    def __init__(self, runner: Context) -> None:
        self.r, self.new_tokens = runner, runner.cfg.new_tokens
        self.cache_len = plan_cache(runner.bundle, runner.cfg)
        self.steps = Steps(runner.bundle, self.cache_len, runner.say, runner.cache_dir)
        self.inputs: dict[Shape, torch.Tensor] = {}
        self.refs: dict[Shape, Generation] = {}
        self.eager_at: dict[Precision, dict[Shape, float]] = {}  # token agreement eager reaches at each lower precision
        self.measured: dict[str, Any] = {}

    def prepare(self) -> None:
        fp32, bundle = self.steps(Precision.FP32), self.r.bundle
        self.inputs = {s: prompts(bundle, s) for s in self.r.cfg.shapes}
        self.refs = references(fp32, self.inputs, self.new_tokens, bundle.name, self.r.say)

    def compile_here(self, name: str, precision: Precision) -> Engine:
        cfg = self.r.cfg
        return steps_engine(registry.get(name), self.steps(precision), precision, cfg.device, cfg.options[name], cfg.shapes,
                            self.new_tokens)

    def request(self, name: str, precision: Precision, cls_path: tuple[str, str]) -> tuple[str, tuple[Any, ...]]:
        cfg, b = self.r.cfg, self.r.bundle
        assert b.spec is not None  # isolated() runs nothing in a worker without one
        req = CompileRequest(b.spec, b.load_task, str(self.r.cache_dir) if self.r.cache_dir else None, "", cfg.quant, name, cls_path,
                             precision, cfg.device, cfg.options[name].to_dict(), tuple(cfg.shapes))
        return "pipeline.genrun:compiled_steps", (req, self.cache_len, self.new_tokens)

    def check(self, engine: Engine, name: str, precision: Precision, floors: dict[Precision, dict[Shape, float]] | None = None,
              ) -> dict[Shape, Result]:
        """Every shape's generation judged; the first at a shape is where lazy compilers compile.
        `floors`: the bar below fp32 (default: what the eager rows of this run reach, recorded as they are judged)."""
        rows = {}
        for s, x in self.inputs.items():
            t0 = time.perf_counter()
            got = engine(x)
            rows[s] = row = judge(name, precision, s, got, self.refs[s], self.eager_at if floors is None else floors, self.new_tokens)
            row.metrics["cache_bytes"] = self.steps.spec(precision).nbytes(s.batch)
            row.compile_s = engine.build_s + time.perf_counter() - t0
        return rows

    def time(self, engines: Engines, rows: Rows) -> None:
        cfg = self.r.cfg
        time_rounds(engines, rows, self.inputs, cfg.rounds, self.r.say)
        for by_shape in rows.values():
            for s, row in by_shape.items():
                base = rows.get(REFERENCE, {}).get(s)
                if base is not None and base.latency_ms and row.latency_ms:
                    row.speedup = speedup(base.latency_ms, row.latency_ms)  # decode steps, paired round by round
        if cfg.device == "cpu":
            self.r.say("measuring memory bandwidth (a large tensor copy)")
            bw = memory_bandwidth()
            self.measured = {"bandwidth_gb_s": bw, "bandwidth_probe_mb": 512, "ceiling_tokens_per_s": bw * 1e9 / self._weight_bytes()}

    def _weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.r.bundle.module.parameters())

    def model(self) -> dict[str, Any]:
        return {**self.r.bundle.describe(), "weight_mb": self._weight_bytes() / 2**20}

    def config(self) -> dict[str, Any]:
        return {**self.r.cfg.to_dict(), "new_tokens": self.new_tokens, "cache_len": self.cache_len, **self.measured}

    def environment(self) -> dict[str, Any]:
        return {}

    def _graphs(self, precision: Precision) -> dict[str, str]:
        """The steps' graph hashes (an int8-dynamic step's: the quantized program's)."""
        return {kind: c.graph_hash for kind, c in zip(STEPS, self.steps(precision).steps)}

    def key(self, name: str, precision: Precision) -> str:
        """Everything that changes the artifact: both steps' graphs, backend, precision, options,
        device, libraries, shapes, cache length and tokens generated at build."""
        cfg = self.r.cfg
        return digest({"graphs": list(self._graphs(precision).values()), "backend": name, "precision": precision.value,
                       "options": cfg.options[name].build_options(), "device": device_info(cfg.device),
                       "requires": registry.get(name).pinned(), "shapes": [str(s) for s in cfg.shapes],
                       "cache_len": self.cache_len, "new_tokens": self.new_tokens,
                       **({"torchao": version("torchao")} if precision.quantized else {})}, 20)

    def accept(self, directory: Path, name: str, precision: Precision) -> Accepted:
        """Both saved steps loaded back from their files in a fresh worker process, which has none of
        the model's code (in this process for a backend class only this script defines), judged at
        every shape by the run's bar and, if all pass, timed beside eager fp32's engine."""
        cfg, say, cls = self.r.cfg, self.r.say, type(registry.get(name))
        args = (str(directory), cfg.device, (cls.__module__, cls.__qualname__), self.steps(precision).spec, self.new_tokens)
        engine: Any = RemoteEngine.make(f"loaded {directory.name}", cfg.timeout_s, say, "pipeline.genrun:loaded_steps", args) \
            if loads_in_worker(self.r.cfg.isolation, name) else loaded_steps(*args)
        try:
            # a copy of the floors: an eager artifact's own row must not become its bar
            rows = self.check(engine, name, precision, {p: dict(v) for p, v in self.eager_at.items()})
            done = Accepted(rows, {s: Result(REFERENCE[0], REFERENCE[1], s, "ok") for s in self.inputs})
            if done.passed:
                time_rounds({"engine": engine, "reference": self.r.engines[REFERENCE]}, {"engine": rows, "reference": done.reference},
                            self.inputs, cfg.rounds, say)
            return done
        finally:
            if isinstance(engine, RemoteEngine):
                engine.close()

    def seal(self, directory: Path, name: str, precision: Precision, key: str, verdict: Accepted, rows: list[Result],
             size_mb: float) -> None:
        """eager fp32's tokens from the build's prompts (kiln verify generates them again), the
        tokenizer, and the manifest: the cache's geometry, both steps, the verdict and the speed."""
        bundle, spec = self.r.bundle, self.steps(precision).spec
        shapes = {}
        for s, row in verdict.rows.items():
            lat, m, base = row.latency_ms, row.metrics, verdict.reference[s]
            shapes[str(s)] = {"agreement": row.agreement, "first_divergence": m.get("first_divergence"),
                              "max_logits_error": row.max_abs, "prefill_ms": m.get("prefill_ms"),
                              "decode_ms": {"median": lat.median, "p90": lat.p90, "p99": lat.p99} if lat else None,
                              "decode_tokens_per_s": m.get("decode_tokens_per_s"), "e2e_tokens_per_s": m.get("e2e_tokens_per_s"),
                              "decode_speedup": speedup(base.latency_ms, lat).value if lat and base.latency_ms else None,
                              "eager_fp32_decode_tokens_per_s": base.metrics.get("decode_tokens_per_s"),
                              **({"eager_agreement": self.eager_at[precision][s]} if s in self.eager_at.get(precision, {}) else {})}
        torch.save({"shapes": {str(s): {"prompt": x, "tokens": self.refs[s].tokens} for s, x in self.inputs.items()},
                    "new_tokens": self.new_tokens}, directory / store.REFERENCE)
        pre = store.save_preprocessor(bundle, directory)
        first = manifest.read(directory / STEPS[0])
        cfg = self.r.cfg
        manifest.write(directory, Manifest(
            name, precision, device_info(cfg.device), dict(first.requires), mode=MODE,
            model=ModelRecord(bundle.name, bundle.task, self._graphs(precision), bundle.source),
            generation={"steps": {kind: kind for kind in STEPS},
                        "cache": {"layers": spec.layers, "heads": spec.heads, "head_dim": spec.head_dim,
                                  "max_len": spec.max_len, "dtype": str(spec.dtype).removeprefix("torch.")},
                        "vocab": int(bundle.inputs["input_ids"].high), "batch": list(first.engine["axis_ranges"]["batch"]),
                        "eos_token_id": _eos(bundle), "decoding": "greedy"},
            verdict=Verdict("pass", "greedy tokens identical to eager fp32's" if precision == Precision.FP32
                            else f"token agreement at least eager's at {precision}, less {AGREEMENT_MARGIN:.0%}",
                            "the saved steps, loaded back from their files in "
                            + ("a fresh worker process" if loads_in_worker(self.r.cfg.isolation, name) else "this process"), new_tokens=self.new_tokens,
                            shapes=shapes),
            environment=environment(cfg.device, registry.libraries()), build_options=cfg.options[name].build_options(), cache_key=key,
            artifact_mb=round(size_mb, 2), notes=tuple(dict.fromkeys([*bundle.notes, *self.r.engines[(name, precision)].notes()])),
            **pre))


def _eos(bundle: Any) -> int | None:
    eos = getattr(getattr(bundle.module, "model", None), "config", None)
    value = getattr(eos, "eos_token_id", None)
    return int(value) if isinstance(value, int) else None
