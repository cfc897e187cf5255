"""`kiln build --mode generate`: deployable generation engines, and what loads and answers with them.

A generation artifact is one directory, ROOT/<model>/<backend>-<precision>-generate/:

    prefill/   the prefill step, an engine directory as `kiln build` writes one (files + manifest.json)
    decode/    the decode step, likewise
    reference.pt         the build's seeded prompts and eager fp32's greedy tokens from them, per shape
    tokenizer files      when the model has a tokenizer
    manifest.json        mode "generate": the cache's geometry, both steps, the verdict and the speed,
                         and the sha256 of every file above, the steps' own manifests included

What ships is what was checked and timed: both steps are saved, loaded back from their files,
generate from every built shape's prompts with the tokens compared to eager fp32's step by step,
and are timed against eager in interleaved rounds; only an artifact that passed is installed
(staged, then renamed into place). Loading checks the manifest, every hash and the library
versions before a backend opens a file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import backends as registry

from . import manifest, store
from .bench import speedup
from .build import BuildOutcome, artifact_mb, name_cache, save_preprocessor, shipped
from .choices import DEFAULTS, TEXT_SHAPES
from .config import check_choices, make_config
from .env import device_info, environment, version
from .errors import GenerationUnsupported, InputError
from .fsutil import clean_stale, digest, safe_name
from .decoding import AGREEMENT_MARGIN, CacheSpec, Generation, agreement, greedy, module_step
from .generate import MODE, STEPS, GenerationEngine, compile_steps, engine_step
from .genrun import (Generate, Steps, device_sync, in_worker, judge, plan_cache, prompts, references,
                     time_rounds)
from .inputs import Shape
from .manifest import Manifest, ModelRecord, Verdict
from .models import ModelBundle, load_model
from .precision import Precision
from .progress import ticking
from .report import Result
from .runner import Progress
from .worker import Worker, backend_of

SUFFIX = "-generate"


def build_generation(model: str | Path | ModelBundle, backends: Sequence[str] | str, precisions: Sequence[str] | str = ("fp32",),
                     shapes: Sequence[str] | str | None = None, root: str | Path = "artifacts", device: str | None = None,
                     options: Mapping[str, Mapping[str, Any]] | None = None, new_tokens: int = DEFAULTS["build-generate"].new_tokens,
                     cache_len: int | None = None, rounds: int = DEFAULTS["build-generate"].rounds, progress: Progress | None = None,
                     cache_dir: str | Path | None = None, task: str | None = None) -> list[BuildOutcome]:
    """Generation engines under root/<model>/<backend>-<precision>-generate/, each installed only
    once its saved steps, loaded back, generated eager fp32's tokens (at fp32; at lower precisions,
    agreement as `kiln run --mode generate` judges it) from every built shape's prompts."""
    say = progress or (lambda _m: None)
    check_choices(backends, need_backends=True)
    if rounds < 1:
        raise InputError(f"--rounds {rounds}: must be an integer >= 1")
    cfg = make_config(backends=backends, precisions=precisions, shapes=TEXT_SHAPES if shapes is None else shapes, device=device, options=options)
    bundle = model if isinstance(model, ModelBundle) else load_model(model, task)
    cache_len = plan_cache(bundle, cfg, new_tokens, cache_len)
    steps = Steps(bundle, cache_len, say, cache_dir)
    fp32 = steps(Precision.FP32)
    inputs = {s: prompts(bundle, s) for s in cfg.shapes}
    refs = references(fp32, inputs, new_tokens, bundle.name, say)
    home = Path(root) / safe_name(bundle.name)
    home.mkdir(parents=True, exist_ok=True)
    clean_stale(home, ".staging-")
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=home))
    floors: dict[Precision, dict[Shape, float]] = {}  # token agreement eager reaches at each lower precision
    outcomes = []
    try:
        for name in cfg.backends:
            backend = registry.get(name)
            for p in cfg.precisions:
                target = home / f"{name}-{p.value}{SUFFIX}"
                refusal = backend.refusal(p, cfg.device, generate=True)
                if refusal:
                    outcomes.append(BuildOutcome(name, p.value, target, *refusal))
                    continue
                job = _Job(bundle, name, p, cfg.device, cfg.options[name], list(cfg.shapes), new_tokens, rounds, target,
                           staging / target.name, say)
                outcomes += name_cache([job.ship(steps, refs, inputs, floors)], steps.cache_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [shipped(o) for o in outcomes]


@dataclass
class _Job:
    bundle: ModelBundle
    backend: str
    precision: Precision
    device: str
    options: Any
    shapes: list[Shape]
    new_tokens: int
    rounds: int
    target: Path
    src: Path
    say: Progress

    def graphs(self, steps: Steps) -> dict[str, str]:
        """The steps' graph hashes (an int8-dynamic step's: the quantized program's)."""
        return {kind: c.graph_hash for kind, c in zip(STEPS, steps(self.precision).steps)}

    def key(self, steps: Steps) -> str:
        """Everything that changes the artifact: both steps' graphs, backend, precision, options,
        device, libraries, shapes, cache length and tokens generated at build."""
        return digest({"graphs": list(self.graphs(steps).values()), "backend": self.backend, "precision": self.precision.value,
                       "options": self.options.build_options(), "device": device_info(self.device),
                       "requires": registry.get(self.backend).pinned(), "shapes": [str(s) for s in self.shapes],
                       "cache_len": steps.cache_len, "new_tokens": self.new_tokens,
                       **({"torchao": version("torchao")} if self.precision.quantized else {})}, 20)

    def outcome(self, status: str, reason: str = "", size: float | None = None) -> BuildOutcome:
        if status not in ("built", "reused"):
            self.say(f"{self.backend} {self.precision}: {status}, not installed ({reason})")
        return BuildOutcome(self.backend, self.precision.value, self.target, status, reason, size)

    def ship(self, steps: Steps, refs: dict[Shape, Generation], inputs: dict[Shape, torch.Tensor],
             floors: dict[Precision, dict[Shape, float]]) -> BuildOutcome:
        workers: list[Worker] = []
        try:
            return self._ship(steps, refs, inputs, floors, workers)
        finally:
            for w in workers:
                w.close()

    def _loaded(self, spec: CacheSpec, workers: list[Worker]) -> Generate:
        """Both saved steps loaded back from their files in a fresh worker process, which has none of
        the model's code (in this process for a backend class only this script defines)."""
        cls = type(registry.get(self.backend))
        if cls.__module__ == "__main__":
            prefill, decode = (registry.get(self.backend).load(self.src / kind, self.device) for kind in STEPS)
            sync = device_sync(self.device)
            return lambda x: greedy(engine_step(prefill), engine_step(decode), spec, x.to(self.device), self.new_tokens, sync)
        worker = Worker(f"loaded {self.target.name}", DEFAULTS["build"].timeout_s, lambda m: self.say(f"{self.backend} {self.precision}: {m}"))
        workers.append(worker)
        worker.call("call", f"{__name__}:_load_steps_in_worker", str(self.src), self.device, (cls.__module__, cls.__qualname__), spec)
        return in_worker(worker, self.new_tokens)

    def _ship(self, steps: Steps, refs: dict[Shape, Generation], inputs: dict[Shape, torch.Tensor],
              floors: dict[Precision, dict[Shape, float]], workers: list[Worker]) -> BuildOutcome:
        backend = registry.get(self.backend)
        try:
            programs = steps(self.precision)
            key = self.key(steps)
            if store.is_current(self.target, key):
                self.say(f"{self.backend} {self.precision}: reusing {self.target} (same steps, options, device and libraries; passed)")
                return self.outcome("reused", f"cache key {key}")
            self.say(f"{self.backend} {self.precision}: compiling the prefill and decode steps")
            with ticking(self.say, f"{self.backend} {self.precision}: compiling the steps"):
                engine = compile_steps(backend, programs, self.precision, self.device, self.options, self.shapes)
            assert engine.models is not None  # compiled step engines, which save
            size = 0.0
            for kind, model in zip(STEPS, engine.models):
                size += artifact_mb(model.save(self.src / kind))
            self.say(f"{self.backend} {self.precision}: checking the saved steps, loaded back from their files in a fresh worker")
            loaded = self._loaded(programs.spec, workers)
        except GenerationUnsupported as e:
            return self.outcome("unsupported", str(e))
        except Exception as e:  # a compiler may raise anything; the build goes on with the next engine
            return self.outcome("failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if self.precision != Precision.FP32 and self.precision not in floors:
            # the bar below fp32: what eager reaches at this precision (the model's own code), as kiln run judges it
            # (moved only off the CPU: a module torch.compile holds refuses .to(), even to where it is)
            own = module_step(programs.module if self.device == "cpu" else programs.module.to(self.device), programs.output_names)
            floors[self.precision] = {s: agreement(refs[s], greedy(own, own, programs.spec, x.to(self.device), self.new_tokens)).agreement
                                      for s, x in inputs.items()}
        rows: dict[tuple[str, Precision, Shape], Result] = {}
        for s, x in inputs.items():
            with ticking(self.say, f"{self.backend} {self.precision}: generating from the {s} prompts with the loaded steps"):
                got = loaded(x)
            # a copy: judge records an eager row's agreement as the floor, and here the floor is the module's
            bar = {p: dict(v) for p, v in floors.items()}
            rows[(self.backend, self.precision, s)] = row = judge(self.backend, self.precision, s, got, refs[s], bar,
                                                                   self.new_tokens)
            if row.status != "ok":
                return self.outcome("mismatch", f"the saved steps, loaded back, at {s}: {row.reason}")
        fp32 = steps(Precision.FP32)
        ref_step = module_step(fp32.module, fp32.output_names)
        # the reference under a name of its own: an eager artifact (its captured program) is timed beside it
        ref = ("eager fp32 reference", Precision.FP32)
        for s in inputs:
            rows[(*ref, s)] = Result(ref[0], Precision.FP32, s, "ok")
        sync = device_sync(self.device)
        time_rounds({(self.backend, self.precision): loaded,
               ref: lambda x: greedy(ref_step, ref_step, fp32.spec, x.to(self.device), self.new_tokens, sync)},
              rows, inputs, self.rounds, self.say)
        shapes = {}
        for s in inputs:
            row, base = rows[(self.backend, self.precision, s)], rows[(*ref, s)]
            lat, m = row.latency_ms, row.metrics
            shapes[str(s)] = {"agreement": row.agreement, "first_divergence": m.get("first_divergence"),
                              "max_logits_error": row.max_abs, "prefill_ms": m.get("prefill_ms"),
                              "decode_ms": {"median": lat.median, "p90": lat.p90, "p99": lat.p99} if lat else None,
                              "decode_tokens_per_s": m.get("decode_tokens_per_s"), "e2e_tokens_per_s": m.get("e2e_tokens_per_s"),
                              "decode_speedup": speedup(base.latency_ms, lat).value if lat and base.latency_ms else None,
                              "eager_fp32_decode_tokens_per_s": base.metrics.get("decode_tokens_per_s"),
                              **({"eager_agreement": floors[self.precision][s]} if self.precision in floors else {})}
        torch.save({"shapes": {str(s): {"prompt": x, "tokens": refs[s].tokens} for s, x in inputs.items()},
                    "new_tokens": self.new_tokens}, self.src / store.REFERENCE)
        pre = save_preprocessor(self.bundle, self.src)
        spec, first = programs.spec, manifest.read(self.src / STEPS[0])
        notes = [*self.bundle.notes, *engine.notes]
        manifest.write(self.src, Manifest(
            self.backend, self.precision, device_info(self.device), dict(first.requires), mode=MODE,
            model=ModelRecord(self.bundle.name, self.bundle.task, self.graphs(steps), self.bundle.source),
            generation={"steps": {kind: kind for kind in STEPS},
                        "cache": {"layers": spec.layers, "heads": spec.heads, "head_dim": spec.head_dim,
                                  "max_len": spec.max_len, "dtype": str(spec.dtype).removeprefix("torch.")},
                        "vocab": int(self.bundle.inputs["input_ids"].high), "batch": list(first.engine["axis_ranges"]["batch"]),
                        "eos_token_id": _eos(self.bundle), "decoding": "greedy"},
            verdict=Verdict("pass", "greedy tokens identical to eager fp32's" if self.precision == Precision.FP32
                            else f"token agreement at least eager's at {self.precision}, less {AGREEMENT_MARGIN:.0%}",
                            "the saved steps, loaded back from their files in a fresh worker process", new_tokens=self.new_tokens,
                            shapes=shapes),
            environment=environment(self.device, registry.libraries()), build_options=self.options.build_options(), cache_key=key,
            artifact_mb=round(size, 2), notes=tuple(notes), **pre))
        store.install(self.src, self.target)
        self.say(f"{self.backend} {self.precision}: built {self.target}")
        return self.outcome("built", "", round(size, 2))


def _load_steps_in_worker(state: dict[str, Any], directory: str, device: str, cls_path: tuple[str, str], spec: CacheSpec) -> None:
    """In a fresh worker: both saved steps, each by its backend's own load (hashes and versions checked first)."""
    d = Path(directory)
    backend = backend_of(manifest.read(d / STEPS[0]).backend, cls_path)
    prefill, decode = (backend.load(d / kind, device) for kind in STEPS)
    state["generation"] = (GenerationEngine.of(prefill, decode), spec, device)


def _eos(bundle: ModelBundle) -> int | None:
    eos = getattr(getattr(bundle.module, "model", None), "config", None)
    value = getattr(eos, "eos_token_id", None)
    return int(value) if isinstance(value, int) else None
