"""The CLI answers at once: help, the model list, the backend list and every argument error are
printed without importing torch (or any backend library), each in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
