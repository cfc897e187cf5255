"""kiln: a thin argparse layer over the API. User errors print one line, no traceback."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InputError, KilnError


def _parse_options(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        backend, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise InputError(f"malformed --option {pair!r}: expected BACKEND.KEY=VALUE, e.g. inductor.mode=max-autotune")
        out.setdefault(backend, {})[name] = value
    return out


def cmd_backends(args: argparse.Namespace) -> int:
    import backends as registry

    from .runner import default_device

    device = args.device or default_device()
    for name in registry.names():
        b = registry.get(name)
        print(f"{name:14s} {b.availability(device)}  [{', '.join(p.value for p in b.precisions)}]")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import DEFAULT_MODEL, model_names

    for name in model_names():
        print(name + ("  (default)" if name == DEFAULT_MODEL else ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .models import load_model
    from .runner import Runner, make_config

    out = Path(args.out) if args.out else Path("artifacts/runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg = make_config(backends=args.backends, precisions=args.precisions, shapes=args.shapes, device=args.device,
                      options=_parse_options(args.option), warmup=args.warmup, rounds=args.rounds,
                      save_engines=out / "engines" if args.save_engines else None)
    progress = None if args.quiet else _progress()
    if progress:
        progress(f"loading model {args.model}")
    bundle = load_model(args.model)
    report = Runner(bundle, cfg, progress, Path(args.cache_dir) if args.cache_dir else None).run()
    files = report.save(out)
    print(report.to_markdown())
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def _progress() -> Any:
    from .runner import _stderr_progress

    return _stderr_progress()


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="kiln", description="Capture a Transformer once, compile it through several backends, "
                                "check equivalence against eager, and benchmark.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backends", help="list backends and whether they can run here")
    b.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    b.set_defaults(func=cmd_backends)
    m = sub.add_parser("models", help="list the built-in models")
    m.set_defaults(func=cmd_models)
    r = sub.add_parser("run", help="capture, compile, compare, benchmark, report")
    r.add_argument("--model", default=DEFAULT_MODEL, help=f"a built-in name (kiln models) or a local HF directory (default {DEFAULT_MODEL})")
    r.add_argument("--backends", default="", help="comma-separated (default: every available backend)")
    r.add_argument("--precisions", default="fp32", help="comma-separated from fp32,fp16,bf16 (default fp32)")
    r.add_argument("--shapes", default="1x128,8x128", help="comma-separated BATCHxSEQ (default 1x128,8x128)")
    r.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    r.add_argument("--out", help="output directory (default artifacts/runs/<timestamp>)")
    r.add_argument("--option", action="append", default=[], metavar="BACKEND.KEY=VALUE", help="a backend option, repeatable")
    r.add_argument("--warmup", type=int, default=5, help="untimed calls per engine and shape (default 5)")
    r.add_argument("--rounds", type=int, default=20, help="interleaved timed rounds (default 20)")
    r.add_argument("--save-engines", action="store_true", help="also save every engine under OUT/engines/")
    r.add_argument("--cache-dir", help="capture and build cache (default artifacts/cache or $KILN_CACHE)")
    r.add_argument("--quiet", action="store_true", help="no progress lines")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
