"""kiln: a thin layer over the API, one function per verb (the grammar: pipeline/parser.py).
User errors print one line, no traceback."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import backends as registry

from .choices import DEFAULT_MODEL, MODELS, TEXT_SHAPES, default_cache_dir, defaults
from . import progress
from .errors import InputError, KilnError
from .config import parse_options
from .fsutil import check_writable, empty_dir
from .parser import build_parser


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


def _preflight(args: argparse.Namespace, verb: str) -> None:
    """Every argument of a run or build checked before torch or any backend is imported, so a
    mistake is one line and exit 2 at once: the model's name, backends, precisions, shapes, device,
    timing, calibration and generation settings. The model's own ranges are checked once it loads."""
    from .choices import model_source
    from .config import check_choices
    from .modelcheck import check_model_dir

    if model_source(args.model) == "dir":
        check_model_dir(args.model)
    if args.mode == "generate" and verb == "run" and args.save_engines:
        raise InputError("--save-engines is for forward runs; deployable generation engines: kiln build --mode generate")
    timing = {"warmup": args.warmup, "rounds": args.rounds, **({"timeout_s": args.timeout} if verb == "run" else {})}
    check_choices(args.backends, args.precisions, TEXT_SHAPES if args.shapes is None else args.shapes, args.device,
                  need_backends=verb == "build", isolation=args.isolation, quant=_quant(args), mode=args.mode,
                  new_tokens=args.new_tokens, cache_len=args.cache_len, **timing)
    # where the job will write, before anything is loaded or compiled: a report is small, engines are not
    if verb == "run":
        args.out = str(_out(args))
        check_writable(args.out, "--out")
    else:
        check_writable(args.root, "--root", min_free_mb=256)
    check_writable(args.cache_dir or default_cache_dir(), "the cache (--cache-dir)", min_free_mb=256)


def _out(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path("artifacts/runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def cmd_run(args: argparse.Namespace) -> int:
    _fill_defaults(args, "run")
    _preflight(args, "run")
    _cache(args)
    from .build import run

    out = _out(args)
    say = None if args.quiet else progress.display()
    report = run(args.model, out=out, progress=say, cache_dir=args.cache_dir, backends=args.backends, precisions=args.precisions,
                 shapes=args.shapes, device=args.device, options=parse_options(args.option), warmup=args.warmup, rounds=args.rounds,
                 isolation=args.isolation, timeout_s=args.timeout, save_engines=out / "engines" if args.save_engines else None,
                 quant=_quant(args), task=args.task, mode=args.mode, new_tokens=args.new_tokens, cache_len=args.cache_len)
    progress.close_displays()  # the bar gives the terminal back before the table
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
    root = Path(args.cache_dir or default_cache_dir())
    if not root.is_dir():
        print(f"no cache at {root}")
        return 0
    files, mb = empty_dir(root)
    print(f"removed {files} files ({mb:.1f} MB) from the cache at {root}")
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
    from .build import build, build_table

    outcomes = build(args.model, args.backends, args.precisions, args.shapes, root=args.root, device=args.device,
                     options=parse_options(args.option), progress=None if args.quiet else progress.display(), cache_dir=args.cache_dir,
                     warmup=args.warmup, rounds=args.rounds, isolation=args.isolation, quant=_quant(args), task=args.task,
                     mode=args.mode, new_tokens=args.new_tokens, cache_len=args.cache_len)
    progress.close_displays()

    print(json.dumps([o.to_dict() for o in outcomes], indent=2) if args.json else build_table(outcomes))
    return 0 if all(o.status in ("built", "reused") for o in outcomes) else 1


def cmd_load(args: argparse.Namespace) -> int:
    from . import manifest
    from .store import is_generation, load, read_reference, require_build

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
    from .store import verify_generation

    if getattr(args, "allow_failed", False):
        raise InputError("--allow-failed is for forward engines; a generation artifact that failed its build was never installed")
    c = verify_generation(args.artifact, args.device, public_key=_public_key(args))
    meta = manifest.read(args.artifact)  # checked by verify_generation above
    print(f"{verb} {meta.backend} {meta.precision} generation artifact of {meta.model.name if meta.model else '?'} "
          f"(static cache of {meta.generation['cache']['max_len']} positions)")
    print(f"{'PASS' if c.passed else 'FAIL'}: {c.reason}")
    return 0 if c.passed else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from .store import is_generation, verify

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
    from .store import is_generation, load_generation
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
    from .gate import baseline_path, check, load_baseline, note, summary, update_baseline
    from .report import Report

    report = Report.load(args.report)
    if args.update_baseline:
        check_writable(baseline_path(args.baseline, report), "--baseline", directory=False)
        print(f"wrote baseline {update_baseline(report, args.baseline)}")
        return 0
    baseline, speed = load_baseline(args.baseline, report)
    checks = check(baseline, report, args.floor, speed=speed, allow_different_model=args.allow_different_model)
    text = summary(checks, args.floor, note(report, baseline, speed, args.baseline))
    print(text)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)  # checked writable before the work
        with open(args.summary, "a") as f:
            f.write(text)
    return 1 if any(c.failed for c in checks) else 0


COMMANDS = {"backends": cmd_backends, "models": cmd_models, "run": cmd_run, "build": cmd_build, "load": cmd_load,
            "verify": cmd_verify, "predict": cmd_predict, "sign": cmd_sign, "triton": cmd_triton, "cache": cmd_cache,
            "check": cmd_check}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("KILN_DEBUG"):  # tracebacks of backends that failed and every library's chatter, for whoever debugs
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    else:
        progress.quiet_libraries()
    try:
        return int(COMMANDS[args.func](args))
    except KilnError as e:
        progress.close_displays()
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.close_displays()
        print("kiln: interrupted", file=sys.stderr)
        return 130
    finally:
        progress.close_displays()


if __name__ == "__main__":
    sys.exit(main())
