"""Export a Kiln engine to a Triton Inference Server model repository: <repo>/<name>/config.pbtxt and <repo>/<name>/<version>/."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .artifacts import check_artifact
from .errors import InputError

# backend -> (Triton platform, the file name Triton expects, Kiln's engine files to copy)
_SERVED = {
    "onnxruntime": ("onnxruntime_onnx", "model.onnx", ("model.onnx", "model.onnx.data")),
    "tensorrt": ("tensorrt_plan", "model.plan", ("model.engine",)),
}
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
          "int32": "TYPE_INT32", "bool": "TYPE_BOOL", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}


def config_pbtxt(name: str, meta: dict[str, Any]) -> str:
    """Triton's model configuration. With a leading batch axis everywhere, max_batch_size is the
    engine's batch limit and dims leave the batch out; any other dynamic dim is -1."""
    platform = _SERVED[meta["backend"]][0]
    tensors = [("input", n, s["dtype"], s["dims"]) for n, s in meta["inputs"].items()]
    tensors += [("output", n, s.get("dtype", "float32"), s["dims"]) for n, s in meta["outputs"].items()]
    batched = all(dims and dims[0] == "batch" for _, _, _, dims in tensors)
    max_batch = 0
    if batched:
        max_batch = int(meta["axis_ranges"]["batch"][1])
        profile = (meta.get("describe") or {}).get("profile")
        if profile:  # a TensorRT engine serves only its profile's batch range
            max_batch = min(max_batch, min(int(p[2][0]) for p in profile.values()))
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}"]
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
    artifact = Path(artifact)
    meta = check_artifact(artifact)
    if meta["backend"] not in _SERVED:
        raise InputError(f"Triton serves ONNX and TensorRT plans from Kiln; a {meta['backend']!r} engine has no Triton "
                         f"backend here (Triton's PyTorch backend takes TorchScript, which Kiln does not produce). "
                         f"Export one of: {', '.join(_SERVED)}")
    name = name or f"{meta['model']['name']}-{meta['backend']}-{meta['precision']}"
    _, target_name, files = _SERVED[meta["backend"]]
    model_dir = Path(repo) / name
    vdir = model_dir / str(version)
    vdir.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        if (artifact / f).is_file():
            shutil.copy2(artifact / f, vdir / (target_name if i == 0 else f))
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, meta))
    return model_dir
