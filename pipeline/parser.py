"""The `kiln` command line's grammar: every verb, option and help text (pipeline/cli.py runs them).
Each default comes from pipeline.choices, so the help and the API say the same (tests/test_defaults.py)."""

from __future__ import annotations

import argparse

from .choices import CALIBRATION_METHODS, DEFAULT_MODEL, GATE_FLOOR, IMAGE_SHAPES, TEXT_SHAPES, QuantSpec, defaults
from .heads import HEADS


def _add_job_args(p: argparse.ArgumentParser) -> None:
    """What run and build share beyond the basics: the head a directory is loaded with, int8's calibration."""
    d = QuantSpec()
    p.add_argument("--task", choices=list(HEADS), help="the head to load a model directory with (default: the one its config.json names)")
    p.add_argument("--calibration", default=d.method, metavar="METHOD",
                   help=f"int8 calibration: {', '.join(CALIBRATION_METHODS)} (default {d.method})")  # checked by QuantSpec: one line, exit 2
    p.add_argument("--calibration-samples", type=int, default=d.samples, metavar="N",
                   help=f"int8 calibration set size, disjoint from the evaluation batches (default {d.samples})")
    p.add_argument("--per-tensor-weights", action="store_true", help="int8 weights with one scale per tensor (default: per channel)")


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
    b.set_defaults(func="backends")
    m = sub.add_parser("models", help="list the built-in models, one line each")
    m.set_defaults(func="models")

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
    r.set_defaults(func="run")

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
    bd.set_defaults(func="build")

    ld = sub.add_parser("load", help="load an engine (signature, hashes and versions checked first) and run its reference inputs")
    ld.add_argument("--allow-failed", action="store_true", help="load even if its build verdict was not a pass")
    ld.set_defaults(func="load")
    vf = sub.add_parser("verify", help="reload an engine and re-run the comparator at every shape it was built for")
    vf.set_defaults(func="verify")
    pr = sub.add_parser("predict", help="answer text (or image files, for an image model) with a built engine: its tokenizer "
                                        "or image processor, the engine, its head's post-processing")
    pr.set_defaults(func="predict")
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
    sg.set_defaults(func="sign")

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
    tr.set_defaults(func="triton")

    ca = sub.add_parser("cache", help="the capture and build cache: kiln cache clean removes every entry")
    ca.add_argument("action", choices=("clean",), help="clean: remove every entry (exports, graphs, engines, tuning databases)")
    ca.add_argument("--cache-dir", help="the cache (default artifacts/cache or $KILN_CACHE)")
    ca.set_defaults(func="cache")

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
    ck.set_defaults(func="check")
    return p


