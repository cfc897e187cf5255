#!/usr/bin/env python
"""Type-check pipeline/ and backends/ with mypy, TensorRT calls included, against tensorrt-stubs.

tensorrt-stubs (TensorRT 10.13's API) is not installed into the environment: installed, it makes
`import tensorrt` succeed as an empty namespace package, and its generated .pyi files have a few
syntax errors (parameters named `in`, a required parameter after defaulted ones). This script
downloads the pinned wheel, extracts the stubs into build/typestubs with those lines repaired,
proves mypy really uses them (a known misuse must fail), then checks the project.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

STUBS = "tensorrt-stubs==10.13.0.35.1"
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "typestubs"

MISUSE = """
import tensorrt as trt
def f(b: trt.Builder) -> None:
    b.create_builder_config().set_memory_pool_limit("workspace", 1)
"""


def fetch_stubs() -> Path:
    marker = OUT / "tensorrt_bindings" / "tensorrt.pyi"
    if marker.is_file():
        return OUT
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp, STUBS], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.endswith(".pyi"):
                    text = z.read(name).decode()
                    text = re.sub(r"\bin: ", "in_: ", text)  # `in` is a keyword
                    text = text.replace(", channel_axis: int)", ", channel_axis: int = ...)")
                    dest = OUT / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_text(text)
    return OUT


# mypy's cache lives outside the checkout, so a fresh clone on the same machine (CI's) reuses what
# it learnt of torch's and transformers' types; mypy re-checks any module whose content changed.
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kiln" / "mypy"


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(OUT), "MYPY_CACHE_DIR": str(CACHE)}
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, env=env, text=True, capture_output=True)


def main() -> int:
    fetch_stubs()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(MISUSE)
    bad = mypy("--no-incremental", f.name)
    os.unlink(f.name)
    if bad.returncode == 0 or "set_memory_pool_limit" not in bad.stdout:
        print("typecheck: mypy did not catch a misused TensorRT call; the stubs are not in use\n" + bad.stdout, file=sys.stderr)
        return 1
    res = mypy("pipeline", "backends")
    print(res.stdout, end="")
    print(res.stderr, end="", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
