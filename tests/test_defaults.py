"""Every default is spelled once, in pipeline.choices: the CLI's help and the API's signatures say
what that table says, and no other module writes a number for one."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from pipeline.choices import DEFAULTS, IMAGE_SHAPES, TEXT_SHAPES, defaults
from pipeline.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _help(verb: str) -> str:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[verb]  # type: ignore[index]
    return " ".join(sub.format_help().split())


def _default(fn: Any, name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


def test_the_cli_help_reads_the_table() -> None:
    shapes = f"default {','.join(TEXT_SHAPES)}; images {','.join(IMAGE_SHAPES)}"
    for verb in ("run", "build"):
        d, g = defaults(verb), defaults(verb, "generate")
        text = _help(verb)
        assert f"(default {d.warmup})" in text and f"(default {d.rounds}; whole generations with --mode generate: {g.rounds})" in text
        assert f"tokens generated after each prompt (default {g.new_tokens})" in text and shapes in text
    assert f"(default {defaults('run').timeout_s:.0f})" in _help("run")
    assert f"(default {defaults('predict').new_tokens})" in _help("predict")


def test_the_api_signatures_read_the_table() -> None:
    from pipeline.build import _config, build, run as run_api
    from pipeline.config import RunConfig
    from pipeline.store import GenerationArtifact

    run = DEFAULTS["run"]
    # the API leaves a default unset (None) and takes it from the table for the verb in the mode asked
    assert all(_default(build, k) is None for k in ("warmup", "rounds", "new_tokens")) and _default(run_api, "new_tokens") is None
    for verb, mode in (("run", "forward"), ("run", "generate"), ("build", "forward"), ("build", "generate")):
        d = defaults(verb, mode)
        cfg = _config(verb, None, {"backends": "eager", "mode": mode, "warmup": None, "rounds": None, "new_tokens": None})
        assert (cfg.mode, cfg.warmup, cfg.rounds, cfg.new_tokens) == (mode, d.warmup, d.rounds, d.new_tokens)
    assert _default(GenerationArtifact.generate_text, "new_tokens") == DEFAULTS["predict"].new_tokens
    config = RunConfig.__dataclass_fields__
    assert (config["warmup"].default, config["rounds"].default, config["timeout_s"].default) == (run.warmup, run.rounds, run.timeout_s)
    assert config["new_tokens"].default == DEFAULTS["run-generate"].new_tokens


def test_no_other_module_spells_a_default() -> None:
    pattern = re.compile(r"\b(warmup|rounds|new_tokens|timeout_s)\s*:\s*(int|float)\s*=\s*[\d.]+")
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for pkg in ("pipeline", "backends") for p in sorted((ROOT / pkg).rglob("*.py"))
             if p.name != "choices.py" for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
