"""The CLI answers at once: help, the model list, the backend list and every argument error are
printed without importing torch (or any backend library), each in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

_PROBE = """
import sys
from pipeline.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in ("torch", "transformers", "onnxruntime", "tvm", "numpy") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
sys.exit(rc)
"""


def _kiln(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, rc, says", [
    (["--help"], 0, "usage: kiln"),
    (["run", "--help"], 0, "--new-tokens"),
    (["build", "--help"], 0, "--cache-len"),
    (["models"], 0, "minilm-l6"),
    (["backends"], 0, "onnxruntime"),
    (["backends", "--device", "cuda"], 0, "no CUDA device"),
    (["run", "--model", "nope"], 2, "unknown model 'nope'"),
    (["run", "--backends", "eager,nope"], 2, "unknown backend 'nope'"),
    (["run", "--precisions", "fp8"], 2, "unknown precision 'fp8'"),
    (["run", "--precisions", ""], 2, "no precisions given"),
    (["run", "--shapes", ""], 2, "no shapes given"),
    (["run", "--shapes", "8by128"], 2, "malformed shape '8by128'"),
    (["run", "--device", "tpu"], 2, "unknown device 'tpu'"),
    (["run", "--rounds", "0"], 2, "--rounds 0: must be an integer >= 1"),
    (["run", "--warmup", "-1"], 2, "--warmup -1: must be an integer >= 0"),
    (["run", "--timeout", "0"], 2, "--timeout 0.0: must be a positive number"),
    (["run", "--calibration", "guess"], 2, "unknown calibration method 'guess'"),
    (["run", "--mode", "generate", "--cache-len", "0"], 2, "--cache-len 0: must be an integer >= 1"),
    (["run", "--mode", "generate", "--new-tokens", "0"], 2, "--new-tokens 0: generate at least one token"),
    (["run", "--cache-len", "16"], 2, "--cache-len is for --mode generate"),
    (["build", "--backends", ""], 2, "name the engines to build"),
    (["build", "--backends", "eager", "--rounds", "0"], 2, "--rounds 0"),
    (["run", "--isolation", "threads"], 2, "invalid choice: 'threads'"),
])
def test_answers_without_torch(argv: list[str], rc: int, says: str) -> None:
    p = _kiln(*argv)
    assert p.returncode == rc, p.stderr
    assert says in p.stdout + p.stderr
    assert "HEAVY:\n" in p.stderr, p.stderr.splitlines()[-1]
    if rc == 2 and not says.startswith("invalid choice"):
        assert p.stderr.count("\n") == 2 and p.stderr.startswith("kiln: error: ")  # one line, then the probe's own


@pytest.mark.slow
def test_a_run_prints_no_library_chatter(tmp_path: Path) -> None:
    """The packaged model loads through from_pretrained (transformers' "Loading weights" bar) and
    int8-dynamic imports torchao (torch's register_constant deprecation): neither reaches the user;
    with KILN_DEBUG they do."""
    argv = [sys.executable, "-m", "pipeline", "run", "--model", "minilm-l6", "--backends", "eager", "--precisions", "int8-dynamic",
            "--shapes", "1x8", "--rounds", "1", "--warmup", "0", "--quiet", "--out", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_DEBUG", "TORCH_LOGS", "HF_HUB_DISABLE_PROGRESS_BARS")}
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [f"wrote {tmp_path / 'run' / 'report.json'} (and .md, .csv)"], p.stderr
    loud = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**env, "KILN_DEBUG": "1"})
    assert loud.returncode == 0 and "Loading weights" in loud.stderr, loud.stderr[-2000:]


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode == 0


def test_output_places_are_checked_before_any_work(tmp_path: Path) -> None:
    """--out, --root, --repo and --summary each on a file, a read-only mount and a full disk (and
    the cache on a file): one line, exit 2, before torch is imported, so before anything is
    loaded, compiled or written."""
    afile = tmp_path / "afile"
    afile.write_text("kept")
    ro, full = tmp_path / "ro", tmp_path / "full"
    mounted = _mount_tmpfs(ro, "ro,size=1m") and _mount_tmpfs(full, "size=1m")
    if mounted:
        subprocess.run(["dd", "if=/dev/zero", f"of={full / 'fill'}", "bs=1k", "count=1024"], capture_output=True)
    places = {"file": (afile, "is a file"), **({"read-only": (ro, "Read-only file system"), "full": (full, "MB free where it lands")}
                                               if mounted else {})}
    verbs = {"--out": lambda at: ["run", "--out", str(at / "run")],
             "--root": lambda at: ["build", "--backends", "eager", "--root", str(at / "art")],
             "--repo": lambda at: ["triton", str(tmp_path), "--repo", str(at / "repo")],
             "--summary": lambda at: ["check", str(afile), "--baseline", str(afile), "--summary", str(at / "summary.md")]}
    cases = [(argv(at), flag, "which is a file, not a directory" if kind == "file" else says)
             for flag, argv in verbs.items() for kind, (at, says) in places.items()]
    cases += [(["run", "--out", str(afile)], "--out", "is a file, not a directory: give a directory"),
              (["run", "--cache-dir", str(afile)], "the cache (--cache-dir)", "is a file"),
              (["check", str(afile), "--baseline", str(afile), "--summary", str(tmp_path)], "--summary", "is a directory, not a file")]
    try:
        for argv, flag, says in cases:
            p = _kiln(*argv)
            assert p.returncode == 2, (argv, p.stderr)
            line = p.stderr.splitlines()[0]
            assert line.startswith(f"kiln: error: {flag} ") and says in line, (argv, line)
            assert "HEAVY:\n" in p.stderr, (argv, p.stderr)
    finally:
        for m in (ro, full):
            subprocess.run(["umount", str(m)], capture_output=True)
    assert afile.read_text() == "kept" and len(cases) >= 7
    assert not (ro / "art").exists() and not (full / "run").exists()


def test_bad_text_and_bad_reports_are_one_line(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    p = _kiln("check", str(listed), "--baseline", str(listed))
    assert p.returncode == 2 and p.stderr.startswith("kiln: error: cannot read report") and "a JSON object" in p.stderr
    p = subprocess.run([sys.executable, "-c", _PROBE, "predict", str(tmp_path), "caf\udce9"], capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONUTF8": "1"}, text=True, errors="surrogateescape")
    assert p.returncode == 2 and "text 1 is not valid UTF-8" in p.stderr, p.stderr


def _tiny_bert_dir(where: Path) -> Path:
    import transformers

    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=64, max_position_embeddings=64)).save_pretrained(where)
    return where


def test_hostile_model_directories_are_one_line_before_anything_loads(tmp_path: Path) -> None:
    """Each refused in one line, exit 2, by reading config.json and the safetensors headers alone:
    torch is never imported, so nothing was allocated and nothing written."""
    import json
    import shutil

    base = _tiny_bert_dir(tmp_path / "base")
    weights = base / "model.safetensors"
    cases: dict[str, tuple[Any, str]] = {
        "negative": ({"hidden_size": -32}, "hidden_size is -32, not a positive integer"),
        "zero": ({"num_hidden_layers": 0}, "num_hidden_layers is 0, not a positive integer"),
        "string": ({"num_attention_heads": "2"}, "num_attention_heads is '2', not a positive integer"),
        "float": ({"intermediate_size": 64.5}, "intermediate_size is 64.5, not a positive integer"),
        "boolean": ({"vocab_size": True}, "vocab_size is True, not a positive integer"),
        "vocabulary-1e12": ({"vocab_size": 10**12}, "billion parameters; a run holds about 5 copies"),
        "positions-2**40": ({"max_position_embeddings": 2**40}, "GiB available"),
        "100000-layers": ({"num_hidden_layers": 100000, "hidden_size": 1024}, "billion parameters"),
        "vocabulary-unlike-the-weights": ({"vocab_size": 1000}, "says vocab_size 1000, but model.safetensors's"),
        "not-an-object": ([1, 2], "config.json is not a JSON object"),
        "truncated": (None, "model.safetensors is truncated"),
        "header-garbage": (b"\xff" * 64, "model.safetensors is truncated or not safetensors"),
    }
    for name, (change, says) in cases.items():
        d = tmp_path / name
        shutil.copytree(base, d)
        if name == "truncated":
            (d / "model.safetensors").write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif isinstance(change, bytes):
            (d / "model.safetensors").write_bytes(change)
        elif isinstance(change, dict):
            config = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**config, **change}))
        else:
            (d / "config.json").write_text(json.dumps(change))
        p = _kiln("run", "--model", str(d), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"))
        assert p.returncode == 2, (name, p.stderr)
        lines = p.stderr.splitlines()
        assert len(lines) == 2 and lines[0].startswith("kiln: error: ") and says in lines[0], (name, lines)
        assert lines[1] == "HEAVY:", (name, lines)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    assert _kiln("run", "--model", str(base), "--help").returncode == 0  # the base directory itself is fine
