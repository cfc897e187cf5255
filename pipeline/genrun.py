"""What is specific to generation: seeded prompts, the static cache's plan, the steps at each
precision, eager fp32's tokens, the token-agreement verdict, interleaved timing of whole
generations, and the steps as one engine (made here or in a worker, saved and loaded back)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

import backends as registry

from . import manifest
from .bench import Timing, median_ci, steady_allocator
from .config import REFERENCE, RunConfig
from .decoding import AGREEMENT_MARGIN, CacheSpec, Generation, agreement, greedy, module_step
from .errors import BackendError, InputError, NumericsError, short
from .generate import STEPS, GenerationEngine, GenerationPrograms, cache_spec, capture_generation, compile_steps, quantized_generation
from .heads import HEADS
from .inputs import Shape
from .models import ModelBundle, load_model
from .precision import Precision
from .progress import report as tell, throttled, ticking
from .references import available_memory
from .report import Result
from .worker import CompileRequest, WorkerCrashed, engine_starts


def memory_bandwidth(mb: int = 512) -> float:
    """GB/s of a large tensor copy (each byte read once and written once), best of five."""
    src = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def prompts(bundle: ModelBundle, shape: Shape) -> torch.Tensor:
    """Seeded prompts of real tokens only (no padding): ids drawn over the vocabulary."""
    g = torch.Generator().manual_seed(7919 + 31 * shape.batch + shape.seq)
    return torch.randint(0, bundle.inputs["input_ids"].high, (shape.batch, shape.seq), generator=g)


def plan_cache(bundle: ModelBundle, cfg: RunConfig) -> int:
    """The static cache's length (default: the longest prompt and the new tokens), refused before
    anything is captured when it cannot hold them, exceeds the model's positions or this machine's memory."""
    if not (bundle.task in HEADS and HEADS[bundle.task].generates):
        raise InputError(f"--mode generate needs a causal LM; {bundle.name} is {bundle.task}")
    new_tokens, longest = cfg.new_tokens, max(s.seq for s in cfg.shapes)
    cache_len = cfg.cache_len or longest + new_tokens
    limit = bundle.axis_ranges.get("seq", (1, cache_len))[1]
    if cache_len > limit:
        raise InputError(f"a static cache of {cache_len} positions is beyond {bundle.name}'s {limit}")
    if longest + new_tokens > cache_len:
        raise InputError(f"a prompt of {longest} tokens and {new_tokens} new ones need {longest + new_tokens} cache "
                         f"positions; --cache-len is {cache_len}")
    _check_cache_memory(bundle, cache_len, max(s.batch for s in cfg.shapes), cfg.precisions)
    return cache_len


class Steps:
    """The generation steps at each precision, made once and captured: in the precision's dtype
    (fp32, fp16, bf16), or quantized first (int8-dynamic: torchao's int8 linear layers)."""

    def __init__(self, bundle: ModelBundle, cache_len: int, say: Callable[[str], None], cache_dir: Path | str | None) -> None:
        self.bundle, self.cache_len, self.say, self.cache_dir = bundle, cache_len, say, cache_dir
        self.made: dict[Precision, GenerationPrograms] = {}

    def spec(self, p: Precision) -> CacheSpec:
        """The cache the steps at `p` hold (int8-dynamic steps keep an fp32 cache), without making them."""
        return dataclasses.replace(cache_spec(self.bundle, self.cache_len), dtype=torch.float32 if p.quantized else p.dtype)

    def __call__(self, p: Precision) -> GenerationPrograms:
        if p not in self.made:
            if p == Precision.INT8_DYNAMIC:
                self.say(f"quantizing the step's linear layers (int8 weights, activations at run time; static cache of {self.cache_len})")
                self.made[p] = quantized_generation(self.bundle, self.cache_len, self.cache_dir)
            elif p.quantized:
                raise BackendError(f"{p} generation is not built (int8-dynamic is: weights int8, activations at run time)")
            else:
                self.say(f"capturing the prefill and decode steps ({p}, static cache of {self.cache_len})")
                # the model's whole batch range: a range ending at the capture's example batch (2)
                # makes TVM's importer lose shapes, and the steps serve any batch anyway
                with ticking(self.say, f"capturing the {p} steps"):
                    self.made[p] = capture_generation(self.bundle, self.cache_len, self.bundle.axis_ranges.get("batch", (1, 64)),
                                                      p.dtype, self.cache_dir)
        return self.made[p]


def references(fp32: GenerationPrograms, inputs: dict[Shape, torch.Tensor], new_tokens: int, name: str,
               say: Callable[[str], None]) -> dict[Shape, Generation]:
    """Eager fp32's greedy generation from every prompt: what every engine is judged by."""
    say("reference: eager fp32 generation with transformers' static cache")
    ref_step = module_step(fp32.module, fp32.output_names)
    refs = {s: greedy(ref_step, ref_step, fp32.spec, x, new_tokens) for s, x in inputs.items()}
    for s, g in refs.items():
        if not all(bool(torch.isfinite(x).all()) for x in g.step_logits):
            raise NumericsError(f"eager fp32 itself gives NaN or Inf logits generating from {name} at {s}")
    return refs


def _check_cache_memory(bundle: ModelBundle, cache_len: int, batch: int, precisions: Sequence[Precision]) -> None:
    """Refuses, before anything is captured, a static cache that cannot fit: a step holds the cache
    it was given and the one it returns, and the reference's generation holds its own pair too."""
    widest = max((p.dtype for p in precisions if not p.quantized), key=lambda d: torch.finfo(d).bits, default=torch.float32)
    spec = dataclasses.replace(cache_spec(bundle, cache_len), dtype=widest)
    need, have = 4 * spec.nbytes(batch), available_memory()
    if have is not None and need > 0.8 * have:
        raise InputError(f"a static cache of {cache_len} positions at batch {batch} is {spec.nbytes(batch) / 2**30:.1f} GiB "
                         f"and generation holds about four ({need / 2**30:.1f} GiB); this machine has {have / 2**30:.1f} GiB "
                         f"available: use a smaller --cache-len or batch")


def judge(name: str, p: Precision, s: Shape, g: Generation, ref: Generation, eager_at: dict[Precision, dict[Shape, float]],
           new_tokens: int) -> Result:
    """fp32: the same tokens as eager fp32 at every step, or a mismatch naming the step. Lower
    precisions: token agreement at least what eager at that precision reaches, less a margin."""
    a = agreement(ref, g)
    upto = a.first_divergence if a.first_divergence is not None else len(a.max_logits_error)
    row = Result(name, p, s, "ok", verdict="pass", agreement=a.agreement, agreement_kind="tokens",
                 max_abs=max(a.max_logits_error[:max(upto, 1)]),  # over the steps before the first divergence
                 metrics={"new_tokens": new_tokens, "first_divergence": a.first_divergence})
    bad = next((i for i, x in enumerate(g.step_logits) if not bool(torch.isfinite(x).all())), None)
    if bad is not None:  # a NaN's argmax is a token too: never a pass
        row.status, row.verdict, row.reason, row.max_abs = "mismatch", "fail", f"NaN or Inf in the logits at step {bad}", None
        return row
    if name == REFERENCE[0] and p != Precision.FP32:
        eager_at.setdefault(p, {})[s] = a.agreement
    if p == Precision.FP32:
        if not a.identical:
            row.status, row.verdict = "mismatch", "fail"
            row.reason = (f"greedy tokens diverge from eager fp32 at step {a.first_divergence} "
                          f"(agreement {a.agreement:.1%} over {new_tokens} steps)")
        return row
    floor = eager_at.get(p, {}).get(s)
    if floor is not None and a.agreement < floor - AGREEMENT_MARGIN:
        row.status, row.verdict = "mismatch", "fail"
        row.reason = f"token agreement {a.agreement:.1%} < {floor - AGREEMENT_MARGIN:.1%} (eager {p}: {floor:.1%})"
    return row


K = TypeVar("K", bound=Hashable)


def time_rounds(engines: Mapping[K, Any], rows: Mapping[K, dict[Shape, Result]], inputs: dict[Shape, torch.Tensor], rounds: int,
                say: Callable[[str], None]) -> None:
    """Whole generations, interleaved: round r runs every engine once at a shape before round r+1.
    On a GPU every step is waited for before its time is taken. A row's latency is its decode
    steps' (every step of every round, in round order, so two engines' samples pair up); prefill
    and end-to-end speed go to its metrics. An engine that fails (its worker dies) loses its row only."""
    steady_allocator()  # as every worker's is
    for s, x in inputs.items():
        live = [k for k in engines if s in rows.get(k, {}) and rows[k][s].status in ("ok", "mismatch")]
        if not live:
            continue
        say(f"timing generation at {s}: {len(live)} engines, {rounds} interleaved rounds")
        gens: dict[K, list[Generation]] = {k: [] for k in live}
        tick = throttled(say)
        for r in range(rounds):
            for k in [k for k in live if k in gens]:
                try:
                    gens[k].append(engines[k](x))
                except Exception as e:  # that engine's row only; the others keep their timings
                    row = rows[k][s]
                    row.status, row.crashed, row.reason = "failed", isinstance(e, WorkerCrashed), f"timing: {short(e)}"
                    del gens[k]
            tick(f"timing generation at {s}: round {r + 1}/{rounds}", r + 1 == rounds)
        for k, done in gens.items():
            row = rows[k][s]
            steps = [ms for g in done for ms in g.decode_ms]
            row.metrics["prefill_ms"] = statistics.median(g.prefill_ms for g in done)
            if steps:
                row.latency_ms = Timing(steps)
                row.metrics["decode_tokens_per_s"] = 1e3 * s.batch / row.latency_ms.median
                low_ms, high_ms = median_ci(steps)
                row.metrics["decode_tokens_per_s_ci"] = [1e3 * s.batch / high_ms, 1e3 * s.batch / low_ms]
            total = statistics.median(g.prefill_ms + sum(g.decode_ms) for g in done)
            row.metrics["e2e_tokens_per_s"] = 1e3 * s.batch * done[0].tokens.shape[1] / total


def device_sync(device: str) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


class StepsEngine:
    """A backend's prefill and decode engines as one engine of the runner's: prompts [batch, seq]
    in, their greedy generation out; saved as two engine directories, prefill/ and decode/."""

    input_names, output_names = ("input_ids",), ("tokens",)

    def __init__(self, precision: Precision, device: str, steps: GenerationEngine, spec: CacheSpec, new_tokens: int,
                 build_s: float) -> None:
        assert steps.models is not None  # compiled step engines, which save
        self.backend, self.precision, self.device, self.build_s = steps.models[1].backend, precision, device, build_s
        self.steps, self.spec, self.new_tokens = steps, spec, new_tokens

    def __call__(self, inputs: torch.Tensor) -> Generation:  # prompts [batch, seq]
        return greedy(self.steps.prefill, self.steps.decode, self.spec, inputs.to(self.device), self.new_tokens, device_sync(self.device))

    def synchronize(self) -> None:
        """Every step is waited for inside `greedy`."""

    def describe(self) -> dict[str, Any]:
        assert self.steps.models is not None
        return dict(self.steps.models[1].describe())  # the decode step's: the one every token costs

    def notes(self) -> list[str]:
        return list(self.steps.notes)

    def save(self, directory: str | Path) -> list[Path]:
        assert self.steps.models is not None
        return [f for kind, m in zip(STEPS, self.steps.models) for f in m.save(Path(directory) / kind)]


def steps_engine(backend: Any, programs: GenerationPrograms, p: Precision, device: str, options: Any, shapes: Sequence[Shape],
                 new_tokens: int) -> StepsEngine:
    t0 = time.perf_counter()
    engine = compile_steps(backend, programs, p, device, options, shapes)
    return StepsEngine(p, device, engine, programs.spec, new_tokens, time.perf_counter() - t0)


def compiled_steps(req: CompileRequest, cache_len: int, new_tokens: int) -> StepsEngine:
    """In a worker: the steps at the request's precision made here (captured ones load from the cache) and compiled."""
    backend = registry.resolve(req.backend, req.cls_path)
    programs = Steps(load_model(req.model_spec, req.model_task), cache_len, tell, req.cache_dir)(req.precision)
    engine_starts()  # the engine's peak, not the model's load
    return steps_engine(backend, programs, req.precision, req.device, backend.options(req.options), req.shapes, new_tokens)


def loaded_steps(directory: str, device: str, cls_path: tuple[str, str] | None, spec: CacheSpec, new_tokens: int) -> StepsEngine:
    """Both saved steps, each by its backend's own load (hashes and versions checked first)."""
    d = Path(directory)
    backend = registry.resolve(manifest.read(d / STEPS[0]).backend, cls_path)
    prefill, decode = (backend.load(d / kind, device) for kind in STEPS)
    return StepsEngine(prefill.precision, device, GenerationEngine.of(prefill, decode), spec, new_tokens, 0.0)
