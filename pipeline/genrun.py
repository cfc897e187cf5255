"""The generate job: every engine generates greedily from the same seeded prompts; tokens are
compared with eager fp32 step by step, and prefill, per-token decode and end-to-end speed are
measured in interleaved rounds, with the KV cache's size and each engine's peak memory."""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import backends as registry

from .bench import MemoryWatch, Timing, median_ci, peak_rss_bytes, reset_peak_rss, speedup
from .choices import DEFAULTS
from .config import REFERENCE, RunConfig
from .env import environment
from .errors import GenerationUnsupported, InputError, KilnError, NumericsError
from .heads import HEADS
from .decoding import AGREEMENT_MARGIN, CacheSpec, Generation, agreement, greedy, module_step
from .generate import GenerationPrograms, cache_spec, capture_generation, compile_steps, quantized_generation
from .inputs import Shape
from .models import ModelBundle, load_model
from .precision import Precision
from .progress import report as tell, throttled, ticking
from .references import available_memory
from .report import Report, Result
from .worker import Worker, WorkerCrashed, backend_of, isolated

DEFAULT_NEW_TOKENS = DEFAULTS["run-generate"].new_tokens
GENERATE_ROUNDS = DEFAULTS["run-generate"].rounds  # whole generations per engine and shape; every decode step a sample


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


def plan_cache(bundle: ModelBundle, cfg: RunConfig, new_tokens: int, cache_len: int | None) -> int:
    """The static cache's length (default: the longest prompt and the new tokens), refused before
    anything is captured when it cannot hold them, exceeds the model's positions or this machine's memory."""
    if not (bundle.task in HEADS and HEADS[bundle.task].generates):
        raise InputError(f"--mode generate needs a causal LM; {bundle.name} is {bundle.task}")
    if new_tokens < 1:
        raise InputError(f"--new-tokens {new_tokens}: generate at least one token")
    longest = max(s.seq for s in cfg.shapes)
    cache_len = cache_len or longest + new_tokens
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
                raise GenerationUnsupported(f"{p} generation is not built (int8-dynamic is: weights int8, activations at run time)")
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


Generate = Callable[[torch.Tensor], Generation]  # prompts [batch, seq] on the host -> their greedy generation


def run_generation(bundle: ModelBundle, cfg: RunConfig, new_tokens: int = DEFAULT_NEW_TOKENS, cache_len: int | None = None,
                   rounds: int = GENERATE_ROUNDS, say: Callable[[str], None] | None = None, bandwidth: bool = True,
                   cache_dir: Path | str | None = None, checkpoint: Callable[[Report], Any] | None = None) -> Report:
    """Every engine's greedy generation from the same prompts, judged against eager fp32's and
    timed in interleaved rounds. Every backend but the reference compiles and generates in a worker
    process of its own (`cfg.isolation`), so a crash costs its row; `checkpoint` gets the report
    so far after each engine."""
    say = say or (lambda _m: None)
    cache_len = plan_cache(bundle, cfg, new_tokens, cache_len)
    at = Steps(bundle, cache_len, say, cache_dir)
    fp32 = at(Precision.FP32)
    inputs = {s: prompts(bundle, s) for s in cfg.shapes}
    refs = references(fp32, inputs, new_tokens, bundle.name, say)
    eager_at: dict[Precision, dict[Shape, float]] = {}  # token agreement eager reaches at each lower precision
    rows: list[Result] = []
    runs: dict[tuple[str, Precision], Generate] = {}
    by_key: dict[tuple[str, Precision, Shape], Result] = {}
    workers: list[Worker] = []
    config: dict[str, Any] = {**cfg.to_dict(), "new_tokens": new_tokens, "cache_len": cache_len, "rounds": rounds}
    weight_bytes = sum(t.numel() * t.element_size() for t in bundle.module.parameters())
    model = {**bundle.describe(), "weight_mb": weight_bytes / 2**20}

    env = environment(cfg.device, registry.libraries())  # read once: the report is rewritten after each engine

    def report() -> Report:
        return Report(model, env, config, list(rows),
                      dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), mode="generate")

    try:
        for name in cfg.engines:  # the reference first, at every precision asked: the others are judged by it
            backend = registry.get(name)
            for p in cfg.precisions_of(name):
                refusal = backend.refusal(p, cfg.device, generate=True)
                if refusal:
                    rows.extend(Result(name, p, s, *refusal) for s in cfg.shapes)
                    continue
                say(f"{name} {p}: compiling the prefill and decode steps" + (" in a worker process" if _isolated(cfg, bundle, name) else ""))
                try:
                    run, notes, peak_mb, compile_s, checks = _compile(bundle, cfg, name, p, at, cache_len, cache_dir, inputs,
                                                                      new_tokens, say, workers)
                except Exception as e:  # a compiler may raise anything, a worker may die: it becomes a row
                    unsupported = isinstance(e, GenerationUnsupported)
                    reason = str(e) if isinstance(e, KilnError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    rows.extend(Result(name, p, s, "unsupported" if unsupported else "failed", reason,
                                       crashed=isinstance(e, WorkerCrashed)) for s in cfg.shapes)
                    if not unsupported:
                        say(f"{name} {p}: failed: {reason}")
                    continue
                runs[(name, p)] = run
                for s, g in checks.items():
                    row = judge(name, p, s, g, refs[s], eager_at, new_tokens)
                    row.reason = "; ".join(x for x in (row.reason, *notes) if x)
                    row.metrics["cache_bytes"] = at.spec(p).nbytes(s.batch)
                    row.peak_host_mb, row.compile_s = peak_mb, compile_s
                    rows.append(row)
                    by_key[(name, p, s)] = row
                if checkpoint:
                    checkpoint(report())
        time_rounds(runs, by_key, inputs, rounds, say)
    finally:
        for w in workers:
            w.close()
    for (_name, _p, shape), row in by_key.items():
        base = by_key.get((*REFERENCE, shape))
        if base is not None and base.latency_ms and row.latency_ms:
            row.speedup = speedup(base.latency_ms, row.latency_ms)  # decode steps, paired round by round
    if bandwidth and cfg.device == "cpu":
        say("measuring memory bandwidth (a large tensor copy)")
        bw = memory_bandwidth()
        config.update(bandwidth_gb_s=bw, bandwidth_probe_mb=512, ceiling_tokens_per_s=bw * 1e9 / weight_bytes)
    return report()


def _isolated(cfg: RunConfig, bundle: ModelBundle, name: str) -> tuple[str, str] | None:
    return isolated(cfg.isolation, bundle.spec, name, REFERENCE[0])


def device_sync(device: str) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


def _compile(bundle: ModelBundle, cfg: RunConfig, name: str, p: Precision, at: Steps, cache_len: int, cache_dir: Path | str | None,
             inputs: dict[Shape, torch.Tensor], new_tokens: int, say: Callable[[str], None],
             workers: list[Worker]) -> tuple[Generate, list[str], float | None, float, dict[Shape, Generation]]:
    """One engine's steps, compiled here or in a worker, and its generation from every shape's
    prompts (where lazy compilers compile): (generate, notes, peak host MB, compile s, generations)."""
    cls_path, label = _isolated(cfg, bundle, name), f"{name} {p}"
    if cls_path is None:
        progs = at(p)
        with MemoryWatch(cfg.device) as watch, ticking(say, f"{label}: compiling the steps and generating"):
            t0 = time.perf_counter()
            engine = compile_steps(registry.get(name), progs, p, cfg.device, cfg.options[name], cfg.shapes)

            def run(x: torch.Tensor) -> Generation:
                return greedy(engine.prefill, engine.decode, progs.spec, x.to(cfg.device), new_tokens, device_sync(cfg.device))

            checks = {s: run(x) for s, x in inputs.items()}
            return run, engine.notes, watch.peak_host_mb, time.perf_counter() - t0, checks
    worker = Worker(label, cfg.timeout_s, lambda m: say(f"{label}: {m}"))
    workers.append(worker)
    t0 = time.perf_counter()
    facts = worker.call("call", f"{__name__}:_steps_in_worker", bundle.spec, bundle.load_task, str(cache_dir) if cache_dir else None,
                        cache_len, name, cls_path, p.value, cfg.device, cfg.options[name].to_dict(), [str(s) for s in cfg.shapes])
    t1 = time.perf_counter()
    remote = in_worker(worker, new_tokens)
    checks = {s: remote(x) for s, x in inputs.items()}
    peak = worker.call("call", f"{__name__}:_peak_in_worker")
    return remote, list(facts["notes"]), peak, float(facts["build_s"]) + time.perf_counter() - t1, checks


def _steps_in_worker(state: dict[str, Any], model_spec: str, model_task: str | None, cache_dir: str | None, cache_len: int,
                     name: str, cls_path: tuple[str, str] | None, precision: str, device: str, options: dict[str, Any],
                     shapes: list[str]) -> dict[str, Any]:
    """In a worker: the steps at `precision` made here (captured ones load from the cache) and compiled by the backend."""
    p, backend = Precision(precision), backend_of(name, cls_path)
    progs = Steps(load_model(model_spec, model_task), cache_len, tell, cache_dir)(p)
    state["rss0"] = reset_peak_rss()  # the engine's peak, not the model's load
    t0 = time.perf_counter()
    engine = compile_steps(backend, progs, p, device, backend.options(options), [Shape.parse(s) for s in shapes])
    state["generation"] = (engine, progs.spec, device)
    return {"notes": engine.notes, "build_s": time.perf_counter() - t0}


def in_worker(worker: Worker, new_tokens: int) -> Generate:
    """The steps a worker holds (state["generation"]) as a Generate: prompts go there, whole generations come back."""
    def generate(prompt: torch.Tensor) -> Generation:
        g: Generation = worker.call("call", f"{__name__}:_generate_in_worker", prompt.cpu(), new_tokens)
        return g
    return generate


def _generate_in_worker(state: dict[str, Any], prompt: torch.Tensor, new_tokens: int) -> Generation:
    engine, spec, device = state["generation"]
    return greedy(engine.prefill, engine.decode, spec, prompt.to(device), new_tokens, device_sync(device))


def _peak_in_worker(state: dict[str, Any]) -> float:
    return (peak_rss_bytes() - state.get("rss0", 0)) / 2**20


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


def time_rounds(runs: dict[tuple[str, Precision], Generate], rows: dict[tuple[str, Precision, Shape], Result],
          inputs: dict[Shape, torch.Tensor], rounds: int, say: Callable[[str], None]) -> None:
    """Whole generations, interleaved: round r runs every engine once at a shape before round r+1.
    On a GPU every step is waited for before its time is taken. A row's latency is its decode
    steps' (every step of every round, in round order, so two engines' samples pair up); prefill
    and end-to-end speed go to its metrics. An engine that fails (its worker dies) loses its row only."""
    for s, x in inputs.items():
        live = [k for k in runs if (k[0], k[1], s) in rows and rows[(k[0], k[1], s)].status in ("ok", "mismatch")]
        if not live:
            continue
        say(f"timing generation at {s}: {len(live)} engines, {rounds} interleaved rounds")
        gens: dict[tuple[str, Precision], list[Generation]] = {k: [] for k in live}
        tick = throttled(say)
        for r in range(rounds):
            for k in [k for k in live if k in gens]:
                try:
                    gens[k].append(runs[k](x))
                except Exception as e:  # that engine's row only; the others keep their timings
                    row = rows[(k[0], k[1], s)]
                    row.status, row.crashed = "failed", isinstance(e, WorkerCrashed)
                    row.reason = f"timing: {e if isinstance(e, KilnError) else type(e).__name__ + ': ' + str(e)}"[:800]
                    del gens[k]
            tick(f"timing generation at {s}: round {r + 1}/{rounds}", r + 1 == rounds)
        for k, done in gens.items():
            row = rows[(k[0], k[1], s)]
            steps = [ms for g in done for ms in g.decode_ms]
            row.metrics["prefill_ms"] = statistics.median(g.prefill_ms for g in done)
            if steps:
                row.latency_ms = Timing(steps)
                row.metrics["decode_tokens_per_s"] = 1e3 * s.batch / row.latency_ms.median
                low_ms, high_ms = median_ci(steps)
                row.metrics["decode_tokens_per_s_ci"] = [1e3 * s.batch / high_ms, 1e3 * s.batch / low_ms]
            total = statistics.median(g.prefill_ms + sum(g.decode_ms) for g in done)
            row.metrics["e2e_tokens_per_s"] = 1e3 * s.batch * done[0].tokens.shape[1] / total
