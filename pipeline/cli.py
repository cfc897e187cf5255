"""kiln: a thin argparse layer over the API. User errors print one line, no traceback."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import backends as registry

from .choices import (CALIBRATION_METHODS, DEFAULT_MODEL, GATE_FLOOR, IMAGE_SHAPES, MODELS, TEXT_SHAPES, QuantSpec,
                      default_cache_dir, defaults)
from .errors import InputError, KilnError
from .fsutil import check_writable
from .heads import HEADS


def _parse_options(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        backend, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise InputError(f"malformed --option {pair!r}: expected BACKEND.KEY=VALUE (kiln backends --options lists them)")
        out.setdefault(backend, {})[name] = value
    return out


def cmd_backends(args: argparse.Namespace) -> int:
    """From package metadata and device nodes, at once; --probe (or --options) imports each backend
    and runs its own check (its libraries loaded, the device seen by them)."""
    from .choices import check_device

    check_device(args.device)
    deep = args.probe or args.options
    if deep:
        from .config import default_device
    device = args.device or (default_device() if deep else "cuda" if registry.cuda_present() else "cpu")
    for name in registry.names() if deep else registry.known_names():
        if not deep:
            entry = registry.BUILTIN.get(name)
            precisions = f"  [{', '.join(entry.precisions)}]" if entry else ""
            print(f"{name:14s} {registry.quick_availability(name, device)}{precisions}")
            continue
        b = registry.get(name)
        print(f"{name:14s} {b.availability(device)}  [{', '.join(p.value for p in b.precisions)}]")
        if args.options:
            for f in dataclasses.fields(b.options_type):
                kind = "run-time" if f.metadata.get("runtime") else "build"
                print(f"    --option {name}.{f.name}={f.default}  ({kind})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    width = max(map(len, MODELS))
    for name, what in MODELS.items():
        print(f"{name:{width}s}  {what}" + ("  (default)" if name == DEFAULT_MODEL else ""))
    return 0


def _quant(args: argparse.Namespace) -> dict[str, Any]:
    return {"method": args.calibration, "samples": args.calibration_samples, "per_channel": not args.per_tensor_weights}


def _add_job_args(p: argparse.ArgumentParser) -> None:
    """What run and build share beyond the basics: the head a directory is loaded with, int8's calibration."""
    d = QuantSpec()
    p.add_argument("--task", choices=list(HEADS), help="the head to load a model directory with (default: the one its config.json names)")
    p.add_argument("--calibration", default=d.method, metavar="METHOD",
                   help=f"int8 calibration: {', '.join(CALIBRATION_METHODS)} (default {d.method})")  # checked by QuantSpec: one line, exit 2
    p.add_argument("--calibration-samples", type=int, default=d.samples, metavar="N",
                   help=f"int8 calibration set size, disjoint from the evaluation batches (default {d.samples})")
    p.add_argument("--per-tensor-weights", action="store_true", help="int8 weights with one scale per tensor (default: per channel)")


def _preflight(args: argparse.Namespace, verb: str) -> None:
    """Every argument of a run or build checked before torch or any backend is imported, so a
    mistake is one line and exit 2 at once: the model's name, backends, precisions, shapes, device,
    timing, calibration and generation settings. The model's own ranges are checked once it loads."""
    from .choices import model_source
    from .config import check_choices
    from .modelcheck import check_model_dir

    if model_source(args.model) == "dir":
        check_model_dir(args.model)
    if args.mode == "generate":
        if verb == "run" and args.save_engines:
            raise InputError("--save-engines is for forward runs; deployable generation engines: kiln build --mode generate")
        if args.new_tokens < 1:
            raise InputError(f"--new-tokens {args.new_tokens}: generate at least one token")
        if args.cache_len is not None and args.cache_len < 1:
            raise InputError(f"--cache-len {args.cache_len}: must be an integer >= 1")
    elif args.cache_len is not None:
        raise InputError("--cache-len is for --mode generate")
    timing = {"warmup": args.warmup, "rounds": args.rounds, **({"timeout_s": args.timeout} if verb == "run" else {})}
    check_choices(args.backends, args.precisions, TEXT_SHAPES if args.shapes is None else args.shapes, args.device,
                  need_backends=verb == "build", isolation=args.isolation, quant=_quant(args), **timing)
    # where the job will write, before anything is loaded or compiled: a report is small, engines are not
    if verb == "run":
        args.out = str(_out(args))
        check_writable(args.out, "--out")
    else:
        check_writable(args.root, "--root", min_free_mb=256)
    check_writable(args.cache_dir or default_cache_dir(), "the cache (--cache-dir)", min_free_mb=256)


def _out(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path("artifacts/runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _generate(args: argparse.Namespace, out: Path, say: Callable[[str], None] | None) -> Any:
    from .config import make_config
    from .genrun import run_generation
    from .models import load_model

    cfg = make_config(backends=args.backends, precisions=args.precisions, shapes=TEXT_SHAPES if args.shapes is None else args.shapes,
                      device=args.device, options=_parse_options(args.option), isolation=args.isolation, timeout_s=args.timeout)
    if say:
        say(f"loading model {args.model}")
    report = run_generation(load_model(args.model, args.task), cfg, args.new_tokens, args.cache_len, args.rounds, say,
                            cache_dir=args.cache_dir, checkpoint=lambda partial: partial.save(out))  # a killed run keeps its rows
    report.save(out)
    return report


def cmd_run(args: argparse.Namespace) -> int:
    _fill_defaults(args, "run")
    _preflight(args, "run")
    _cache(args)
    from .build import run

    out = _out(args)
    say = None if args.quiet else _progress()
    report = _generate(args, out, say) if args.mode == "generate" else         run(args.model, out=out, progress=say, cache_dir=args.cache_dir, backends=args.backends, precisions=args.precisions,
            shapes=args.shapes, device=args.device, options=_parse_options(args.option), warmup=args.warmup, rounds=args.rounds,
            isolation=args.isolation, timeout_s=args.timeout, save_engines=out / "engines" if args.save_engines else None,
            quant=_quant(args), task=args.task)
    _close_progress()  # the bar gives the terminal back before the table
    print(report.to_json() if args.json else report.to_markdown())
    print(f"wrote {out / 'report.json'} (and .md, .csv)", file=sys.stderr)
    crashed = sorted({f"{r.backend} {r.precision}" for r in report.results if r.crashed})
    if crashed:
        print(f"kiln: the worker of {', '.join(crashed)} crashed; every other row is in the report", file=sys.stderr)
    return 1 if crashed else 0


def _cache(args: argparse.Namespace) -> None:
    """--no-cache: a fresh cache of this command's own, removed when it ends."""
    if args.no_cache:
        import atexit
        import shutil
        import tempfile

        if args.cache_dir:
            raise InputError("--no-cache and --cache-dir: give one of them")
        args.cache_dir = tempfile.mkdtemp(prefix="kiln-nocache-")
        atexit.register(shutil.rmtree, args.cache_dir, True)


def cmd_cache(args: argparse.Namespace) -> int:
    """kiln cache clean: every entry of the cache removed (exports, graphs, engines, tuning databases)."""
    import shutil

    root = Path(args.cache_dir or default_cache_dir())
    if not root.is_dir():
        print(f"no cache at {root}")
        return 0
    entries = [p for p in root.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in entries) / 2**20
    for child in root.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    print(f"removed {len(entries)} files ({size:.1f} MB) from the cache at {root}")
    return 0


def _fill_defaults(args: argparse.Namespace, verb: str) -> None:
    """The verb's defaults in the mode asked (pipeline.choices.DEFAULTS) for what was not given."""
    d = defaults(verb, args.mode)
    for key in ("warmup", "rounds", "new_tokens", "timeout"):
        if getattr(args, key, "absent") is None:
            setattr(args, key, getattr(d, "timeout_s" if key == "timeout" else key))


def cmd_build(args: argparse.Namespace) -> int:
    _fill_defaults(args, "build")
    _preflight(args, "build")
    _cache(args)
    common = dict(root=args.root, device=args.device, options=_parse_options(args.option), rounds=args.rounds,
                  progress=None if args.quiet else _progress(), cache_dir=args.cache_dir, task=args.task)
    if args.mode == "generate":
        from .genbuild import build_generation

        outcomes = build_generation(args.model, args.backends, args.precisions, args.shapes, new_tokens=args.new_tokens,
                                    cache_len=args.cache_len, **common)  # type: ignore[arg-type]
    else:
        from .build import build

        outcomes = build(args.model, args.backends, args.precisions, args.shapes, warmup=args.warmup, isolation=args.isolation,
                         quant=_quant(args), **common)  # type: ignore[arg-type]
    _close_progress()
    from .build import build_table

    print(json.dumps([o.to_dict() for o in outcomes], indent=2) if args.json else build_table(outcomes))
    return 0 if all(o.status in ("built", "reused") for o in outcomes) else 1


def cmd_load(args: argparse.Namespace) -> int:
    from .genbuild import is_generation
    from . import manifest
    from .store import load, read_reference, require_build

    if is_generation(args.artifact):
        return _check_generation(args, "loaded")
    model = load(args.artifact, args.device, allow_failed=args.allow_failed, public_key=_public_key(args))
    meta = manifest.read(args.artifact)
    require_build(Path(args.artifact), meta, "kiln load")
    ref = read_reference(args.artifact)
    assert meta.model is not None  # require_build
    print(f"loaded {meta.backend} {meta.precision} engine of {meta.model.name} (graph {meta.model.graph_hash}) on {model.device}")
    for x in (x for batches in ref.values() for x in batches["inputs"]):
        t0 = time.perf_counter()
        out = model({k: v.to(model.device) for k, v in x.items()})
        model.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        shapes = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in out.items())
        print(f"  input {tuple(next(iter(x.values())).shape)} -> {shapes}  ({ms:.1f} ms, first calls included)")
    return 0


def _check_generation(args: argparse.Namespace, verb: str) -> int:
    """A generation artifact loaded (checked first) and run on its build's prompts, tokens against eager fp32's."""
    from . import manifest
    from .genbuild import verify_generation

    if getattr(args, "allow_failed", False):
        raise InputError("--allow-failed is for forward engines; a generation artifact that failed its build was never installed")
    c = verify_generation(args.artifact, args.device, public_key=_public_key(args))
    meta = manifest.read(args.artifact)  # checked by verify_generation above
    print(f"{verb} {meta.backend} {meta.precision} generation artifact of {meta.model.name if meta.model else '?'} "
          f"(static cache of {meta.generation['cache']['max_len']} positions)")
    print(f"{'PASS' if c.passed else 'FAIL'}: {c.reason}")
    return 0 if c.passed else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from .genbuild import is_generation
    from .store import verify

    if is_generation(args.artifact):
        return _check_generation(args, "verified")
    c = verify(args.artifact, args.device, public_key=_public_key(args))
    print(f"{'PASS' if c.passed else 'FAIL'}: {c.reason}")
    return 0 if c.passed else 1


def cmd_predict(args: argparse.Namespace) -> int:
    for i, text in enumerate(args.texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # the shell handed over bytes that are not UTF-8 (kept as surrogates)
            raise InputError(f"text {i + 1} is not valid UTF-8: {text.encode('utf-8', 'backslashreplace')[:60]!r}") from None
    from .genbuild import is_generation, load_generation
    from .predict import Predictor

    if is_generation(args.artifact):
        art = load_generation(args.artifact, args.device, allow_failed=args.allow_failed, public_key=_public_key(args))
        args.new_tokens = defaults("predict").new_tokens if args.new_tokens is None else args.new_tokens
        if args.new_tokens < 1:
            raise InputError(f"--new-tokens {args.new_tokens}: must be an integer >= 1")
        answers = art.generate_text(args.texts, args.new_tokens)
        cut_says = ("prompt {i} is {tokens} tokens and the cache leaves room for {kept} beside " f"{args.new_tokens} "
                    "new ones: generated from its last {kept}")
    else:
        if args.new_tokens is not None:
            raise InputError("--new-tokens is for generation artifacts (kiln build --mode generate)")
        predictor = Predictor.load(args.artifact, args.device, allow_failed=args.allow_failed, public_key=_public_key(args))
        answers = predictor.predict(args.texts)
        cut_says = "text {i} is {tokens} tokens and the engine takes at most {kept}: answered from its first {kept}"
    for i, answer in enumerate(answers):
        cut = answer.get("truncated")
        if cut:
            print("kiln: " + cut_says.format(i=i + 1, **cut), file=sys.stderr)
        print(json.dumps(answer))
    return 0


def _public_key(args: argparse.Namespace) -> str | None:
    if args.require_signature and not args.key:
        raise InputError("--require-signature needs --key PUBLIC.pem, the key the artifact was signed for")
    return args.key if args.require_signature else None


def cmd_sign(args: argparse.Namespace) -> int:
    from .signing import sign

    print(f"signed {args.artifact}: {sign(args.artifact, args.key, args.password)}")
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    check_writable(args.repo, "--repo", min_free_mb=64)
    from .triton import export_triton


    path = export_triton(args.artifact, args.repo, args.name, args.version, text=args.text, allow_failed=args.allow_failed,
                         public_key=_public_key(args))
    print(f"wrote Triton model {path} (config.pbtxt, {args.version}/)")
    if args.text:
        print(f"wrote {path.name}-tokenizer (Python backend) and {path.name}-text (the ensemble a client sends strings to)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.summary:
        check_writable(args.summary, "--summary", directory=False)
    from .gate import baseline_path, check, load_baseline, summary, update_baseline
    from .report import Report

    report = Report.load(args.report)
    if args.update_baseline:
        check_writable(baseline_path(args.baseline, report), "--baseline", directory=False)
        print(f"wrote baseline {update_baseline(report, args.baseline)}")
        return 0
    baseline, speed = load_baseline(args.baseline, report)
    checks = check(baseline, report, args.floor, speed=speed, allow_different_model=args.allow_different_model)
    note = "" if speed else (f"Speed is not gated: {args.baseline} has no baseline for this host kind "
                             f"({report.environment.get('host')}); accuracy is gated against {baseline.get('host')}'s. "
                             f"Add one with --update-baseline on this host kind.")
    if report.noisy:
        note = f"Speed: not judged, machine busy ({report.noisy}); accuracy is gated. {note}".strip()
    text = summary(checks, args.floor, note)
    print(text)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)  # checked writable before the work
        with open(args.summary, "a") as f:
            f.write(text)
    return 1 if any(c.failed for c in checks) else 0


class Lines:
    """Progress as plain lines on stderr, each with the seconds since the command started: what CI logs keep."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class Bar(Lines):
    """Progress on a terminal: every line kept above a live `rich` bar that shows the latest one,
    the time since the start and, while a backend autotunes, its trials measured of those planned."""

    _TRIALS = re.compile(r"(\d+)/(\d+) trials measured")

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        super().__init__()
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console or Console(stderr=True), transient=True)
        self.task = self.bar.add_task("starting", total=None)
        self.bar.start()

    def __call__(self, msg: str) -> None:
        self.bar.console.print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", markup=False, highlight=False)
        trials = self._TRIALS.search(msg)
        short = msg if len(msg) <= 60 else msg[:57] + "..."
        if trials:
            self.bar.update(self.task, description=short, completed=int(trials[1]), total=int(trials[2]))
        elif self.bar.tasks[0].total is not None:  # no count now: a spinner again (update cannot unset a total)
            self.bar.remove_task(self.task)
            self.task = self.bar.add_task(short, total=None)
        else:
            self.bar.update(self.task, description=short)

    def close(self) -> None:
        self.bar.stop()


_open: list[Lines] = []


def _progress() -> Lines:
    """A rich bar on a terminal, plain timestamped lines anywhere else (CI logs, pipes)."""
    tty = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    _open.append(Bar() if tty else Lines())
    return _open[-1]


def build_parser() -> argparse.ArgumentParser:
    run_d = defaults("run")
    p = argparse.ArgumentParser(prog="kiln", description="Capture a Transformer once, compile it through several backends, "
                                "check equivalence against eager, and benchmark.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backends", help="list backends and whether they can run here")
    b.add_argument("--device", help="cpu or cuda (default: cuda if a device is present)")
    b.add_argument("--probe", action="store_true", help="import each backend and run its own check (default: package metadata "
                                                        "and device nodes only, which answers at once)")
    b.add_argument("--options", action="store_true", help="also list each backend's options and their defaults (imports them)")
    b.set_defaults(func=cmd_backends)
    m = sub.add_parser("models", help="list the built-in models, one line each")
    m.set_defaults(func=cmd_models)

    def job(sp: argparse.ArgumentParser, verb: str) -> None:
        """What run and build share; each default comes from pipeline.choices.DEFAULTS."""
        d, g = defaults(verb), defaults(verb, "generate")
        sp.add_argument("--model", default=DEFAULT_MODEL, help=f"a built-in name (kiln models), a local Hugging Face "
                                                               f"directory or a hub id in the local cache (default {DEFAULT_MODEL})")
        sp.add_argument("--precisions", default="fp32", help="comma-separated from fp32,fp16,bf16,int8,int8-dynamic (default fp32)")
        sp.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present)")
        sp.add_argument("--option", action="append", default=[], metavar="BACKEND.KEY=VALUE",
                        help="a backend option, repeatable (kiln backends --options lists them)")
        sp.add_argument("--warmup", type=int, help=f"untimed calls per engine and shape (default {d.warmup})")
        sp.add_argument("--rounds", type=int, help=f"interleaved timed rounds (default {d.rounds}; whole generations with "
                                                   f"--mode generate: {g.rounds})")
        sp.add_argument("--new-tokens", type=int, help=f"--mode generate: tokens generated after each prompt (default {g.new_tokens})")
        sp.add_argument("--cache-len", type=int, help="--mode generate: the static cache's positions, the most a prompt and its "
                                                      "continuation take (default longest prompt + new tokens)")
        sp.add_argument("--cache-dir", help="capture and build cache (default artifacts/cache or $KILN_CACHE)")
        sp.add_argument("--no-cache", action="store_true", help="neither reuse nor fill the cache: every export, graph and "
                                                                "tuning made anew in a temporary cache, removed after")
        sp.add_argument("--quiet", action="store_true", help="no progress lines")
        _add_job_args(sp)

    r = sub.add_parser("run", help="capture, compile, compare, benchmark, report")
    job(r, "run")
    r.add_argument("--backends", default="", help="comma-separated (default: every registered backend; those that cannot run "
                                                  "here are rows that say why)")
    r.add_argument("--shapes", help=f"comma-separated BATCHxSEQ, or batch sizes for an image model (default {','.join(TEXT_SHAPES)}; "
                                    f"images {','.join(IMAGE_SHAPES)})")
    r.add_argument("--out", help="output directory (default artifacts/runs/<timestamp>)")
    r.add_argument("--mode", default="forward", choices=("forward", "generate"),
                   help="forward: one pass per call (default); generate: greedy decoding with a static KV cache (causal LMs)")
    r.add_argument("--save-engines", action="store_true", help="also save every engine under OUT/engines/")
    r.add_argument("--isolation", default="process", choices=("process", "none"),
                   help="process (default): each backend in a worker process, so a crash costs one row; none: one process")
    r.add_argument("--timeout", type=float, help=f"seconds one worker request may take (default {run_d.timeout_s:.0f})")
    r.add_argument("--json", action="store_true", help="print the report as JSON (report.json's text) instead of the table")
    r.set_defaults(func=cmd_run)

    bd = sub.add_parser("build", help="build deployable engines under ROOT/<model>/<backend>-<precision>/ (reused when unchanged)")
    job(bd, "build")
    bd.add_argument("--backends", required=True, help="comma-separated: the engines to build (kiln backends lists them)")
    bd.add_argument("--shapes", help="the shapes checked and timed at build; engines built for a shape range (profiles) span them "
                                     f"(default {','.join(TEXT_SHAPES)}; images {','.join(IMAGE_SHAPES)})")
    bd.add_argument("--root", default="artifacts", help="where engines go (default artifacts)")
    bd.add_argument("--mode", default="forward", choices=("forward", "generate"),
                    help="generate: a causal LM's prefill and decode steps with a static KV cache, ROOT/<model>/<backend>-<precision>-generate/")
    bd.add_argument("--isolation", default="process", choices=("process", "none"),
                    help="process (default): compile in a worker and check the saved engine in a fresh one; none: one process")
    bd.add_argument("--json", action="store_true", help="print what was built as JSON (per engine: status, path, size, "
                                                        "and per shape its verdict, tolerance and speed) instead of the table")
    bd.set_defaults(func=cmd_build)

    ld = sub.add_parser("load", help="load an engine (signature, hashes and versions checked first) and run its reference inputs")
    ld.add_argument("--allow-failed", action="store_true", help="load even if its build verdict was not a pass")
    ld.set_defaults(func=cmd_load)
    vf = sub.add_parser("verify", help="reload an engine and re-run the comparator at every shape it was built for")
    vf.set_defaults(func=cmd_verify)
    pr = sub.add_parser("predict", help="answer text (or image files, for an image model) with a built engine: its tokenizer "
                                        "or image processor, the engine, its head's post-processing")
    pr.set_defaults(func=cmd_predict)
    pr.add_argument("--allow-failed", action="store_true", help="answer even if its build verdict was not a pass")
    for sp in (ld, vf, pr):
        sp.add_argument("artifact", help="an engine directory kiln build installed")
        sp.add_argument("--device", help="cpu, cuda or cuda:N (default: the engine's own)")
        sp.add_argument("--require-signature", action="store_true", help="refuse it unless its signature verifies with --key")
        sp.add_argument("--key", help="the public key (PEM) the artifact was signed for")
    pr.add_argument("texts", nargs="+", metavar="TEXT", help="the texts (or image files) to answer")
    pr.add_argument("--new-tokens", type=int, help=f"a generation artifact: tokens generated per prompt (default "
                                                   f"{defaults('predict').new_tokens})")

    sg = sub.add_parser("sign", help="sign an engine directory (OpenSSF model-signing, a private EC key, offline)")
    sg.add_argument("artifact", help="the engine directory to sign (every file, the manifest included)")
    sg.add_argument("--key", required=True, help="the private key (PEM)")
    sg.add_argument("--password", help="the private key's password, if it has one")
    sg.set_defaults(func=cmd_sign)

    tr = sub.add_parser("triton", help="export an engine to a Triton model repository (engines whose backend Triton serves)")
    tr.add_argument("artifact", help="an engine directory kiln build installed")
    tr.add_argument("--repo", required=True, help="the model repository (created if missing; other models kept)")
    tr.add_argument("--name", help="the model's name in the repository (default the artifact's model and engine)")
    tr.add_argument("--version", type=int, default=1, help="the version directory to write (default 1)")
    tr.add_argument("--text", action="store_true",
                    help="also the tokenizer as a Python-backend model and an ensemble, so the repository takes text")
    tr.add_argument("--allow-failed", action="store_true", help="export even if its build verdict was not a pass")
    tr.add_argument("--require-signature", action="store_true", help="refuse it unless its signature verifies with --key")
    tr.add_argument("--key", help="the public key (PEM) the artifact was signed for")
    tr.set_defaults(func=cmd_triton)

    ca = sub.add_parser("cache", help="the capture and build cache: kiln cache clean removes every entry")
    ca.add_argument("action", choices=("clean",), help="clean: remove every entry (exports, graphs, engines, tuning databases)")
    ca.add_argument("--cache-dir", help="the cache (default artifacts/cache or $KILN_CACHE)")
    ca.set_defaults(func=cmd_cache)

    ck = sub.add_parser("check", help="CI gate: compare a report with a baseline (exit 0 pass, 1 regression, 2 bad input)")
    ck.add_argument("report", help="a report.json from kiln run")
    ck.add_argument("--baseline", required=True, help="a baseline file, or a directory of <host>.json baselines "
                                                      "(made from a report with --update-baseline)")
    ck.add_argument("--allow-different-model", action="store_true",
                    help="compare even if model, graph, device kind or precisions differ from the baseline's")
    ck.add_argument("--update-baseline", action="store_true", help="write the report as the new baseline instead (into a "
                                                                   "directory: this host kind's <host>.json)")
    ck.add_argument("--floor", type=float, default=GATE_FLOOR,
                    help=f"smallest allowed speedup drop, as a fraction (default {GATE_FLOOR:.2f})")
    ck.add_argument("--summary", help="also append the Markdown summary to this file (e.g. $GITHUB_STEP_SUMMARY)")
    ck.set_defaults(func=cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("KILN_DEBUG"):  # tracebacks of backends that failed and every library's chatter, for whoever debugs
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    else:
        _quiet_libraries()
    try:
        return int(args.func(args))
    except KilnError as e:
        _close_progress()
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress()
        print("kiln: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_progress()


def _quiet_libraries() -> None:
    """What libraries print that tells a Kiln user nothing goes to the debug log (KILN_DEBUG=1 shows
    it): Python warnings (torchao's deprecations among them), torch's own log lines and the progress
    bars of transformers and huggingface_hub ("Loading weights"). Set before they are imported, so
    workers inherit it; a user's own settings of these variables win. Errors still print."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_LOGS", "-all")  # every torch logger at ERROR
    logging.captureWarnings(True)
    chatter = logging.getLogger("py.warnings")
    chatter.addHandler(logging.NullHandler())
    chatter.propagate = False


def _close_progress() -> None:
    while _open:
        _open.pop().close()


if __name__ == "__main__":
    sys.exit(main())
