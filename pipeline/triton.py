"""Export a Kiln engine to a Triton Inference Server model repository: <repo>/<name>/config.pbtxt and
<repo>/<name>/<version>/. Which platform serves an engine, and under which file names, is the
engine's backend's answer (Backend.serving)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .errors import InputError
from .store import check_artifact

_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
          "int32": "TYPE_INT32", "bool": "TYPE_BOOL", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}


def config_pbtxt(name: str, meta: dict[str, Any]) -> str:
    """Triton's model configuration. With a leading batch axis everywhere, max_batch_size is the
    engine's batch limit and dims leave the batch out; any other dynamic dim is -1."""
    import backends as registry

    serving = registry.get(meta["backend"]).serving(meta)
    if serving is None:
        raise InputError(f"a {meta['backend']!r} engine has no Triton backend")
    tensors = [("input", n, s["dtype"], s["dims"]) for n, s in meta["inputs"].items()]
    tensors += [("output", n, s.get("dtype", "float32"), s["dims"]) for n, s in meta["outputs"].items()]
    batched = all(dims and dims[0] == "batch" for _, _, _, dims in tensors)
    max_batch = 0
    if batched:
        max_batch = int(meta["axis_ranges"]["batch"][1])
        if serving.max_batch is not None:
            max_batch = min(max_batch, serving.max_batch)
    lines = [f'name: "{name}"', f'platform: "{serving.platform}"', f"max_batch_size: {max_batch}"]
    for kind in ("input", "output"):
        entries = []
        for k, n, dtype, dims in tensors:
            if k != kind:
                continue
            shown = dims[1:] if batched else dims
            d = ", ".join("-1" if isinstance(x, str) else str(x) for x in shown)
            entries.append(f'  {{\n    name: "{n}"\n    data_type: {_TYPES[dtype]}\n    dims: [ {d} ]\n  }}')
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    if batched:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def export_triton(artifact: str | Path, repo: str | Path, name: str | None = None, version: int = 1) -> Path:
    import backends as registry

    artifact = Path(artifact)
    meta = check_artifact(artifact)
    serving = registry.get(meta["backend"]).serving(meta)
    if serving is None:
        servable = [n for n in registry.names() if registry.get(n).serving_platform]
        raise InputError(f"a {meta['backend']!r} engine has no Triton backend here (Triton's PyTorch backend takes "
                         f"TorchScript, which Kiln does not produce). Export one of: {', '.join(servable)}")
    name = name or f"{meta['model']['name']}-{meta['backend']}-{meta['precision']}"
    model_dir = Path(repo) / name
    vdir = model_dir / str(version)
    vdir.mkdir(parents=True, exist_ok=True)
    for src, dst in serving.files.items():
        if (artifact / src).is_file():
            shutil.copy2(artifact / src, vdir / dst)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, meta))
    return model_dir
