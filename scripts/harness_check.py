"""Does the harness time an engine the same wherever it lives? Runs `kiln run` with a twin of the
reference backend (its class under another name) beside the backends given: the reference runs in
the run's own process, the twin in a worker like every other backend, so the twin's speedup over
the reference is the harness's own distortion (1.00x when there is none).

    python scripts/harness_check.py --backends inductor,onnxruntime --precisions fp32 --rounds 30

Every argument goes to `kiln run`; `--backends` gets the twin added."""

from __future__ import annotations

import sys

import backends as registry
from pipeline.config import REFERENCE

TWIN = "reference-twin"
Twin = type("Twin", (type(registry.get(REFERENCE[0])),), {"name": TWIN, "__module__": "harness_check"})


def main(argv: list[str]) -> int:
    import harness_check  # the class by a module name a worker can import (this file's directory is on its path)
    from pipeline.cli import main as kiln

    registry.register(harness_check.Twin())
    args = list(argv)
    if "--backends" in args:
        i = args.index("--backends") + 1
        args[i] = f"{TWIN},{args[i]}"
    else:
        args += ["--backends", TWIN]
    return kiln(["run", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
