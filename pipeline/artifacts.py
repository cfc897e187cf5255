"""Deployable engines under artifacts/<model>/<backend>-<precision>/: build, reuse, load, verify.

An engine directory holds the backend's files, `reference.pt` (inputs and eager fp32 outputs
for `verify`) and `manifest.json`, written last: the sha256 of every file, the versions it needs,
what it was built from and how, and the verdict and speed measured at build. A directory is
staged under a hidden name and renamed into place whole, so an interrupted build leaves nothing
that a load accepts. Loading checks hashes and versions before any file of the engine is opened
by its backend (a .so or .pt2 runs code when loaded).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import backends as registry
from backends.base import ENGINE_META, CompiledModel

from .bench import _version, environment
from .capture import Captured, capture
from .compare import Comparator, Comparison
from .errors import ArtifactError
from .inputs import Shape, make_inputs
from .models import ModelBundle, load_model
from .precision import Precision, Tolerance
from .report import atomic_write
from .runner import Progress, Runner, make_config

MANIFEST, REFERENCE, KIND, SCHEMA = "manifest.json", "reference.pt", "kiln-engine", 1
# The library versions an engine is tied to: exact for compiled code, major.minor for archives.
_LIBS = {"eager": ("torch",), "inductor": ("torch",), "onnxruntime": ("onnxruntime",),
         "tensorrt": ("tensorrt",), "torch-tensorrt": ("torch", "torch-tensorrt")}
_EXACT = {"inductor", "tensorrt", "torch-tensorrt"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _requires(backend: str) -> dict[str, str]:
    out = {}
    for dist in _LIBS.get(backend, ("torch",)):
        v = (_version(dist) or "none").split("+")[0]
        out[dist] = v if backend in _EXACT else ".".join(v.split(".")[:2])
    return out


def _device_info(device: str) -> dict[str, Any]:
    env = environment(device)
    return {"type": device.split(":")[0], "arch": env.get("capability") or env.get("cpu"), "name": env.get("gpu") or env.get("cpu")}


def cache_key(captured: Captured, backend: str, precision: Precision, options: dict[str, Any], device: str,
              shapes: Sequence[Shape]) -> str:
    """Everything that changes the engine: graph, backend, precision, build options, device, library, shapes."""
    blob = json.dumps({"graph": captured.graph_hash, "backend": backend, "precision": precision.value, "options": options,
                       "device": _device_info(device), "requires": _requires(backend), "shapes": [str(s) for s in shapes]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _dims(bundle: ModelBundle) -> dict[str, list[int | str]]:
    """Each output's dims, with batch and seq named: eager at two small shapes tells which dims follow which axis."""
    a, b = Shape(2, 3), Shape(3, 5)
    with torch.no_grad():
        oa, ob = (bundle.module(**make_inputs(bundle, s, "random")) for s in (a, b))
    out: dict[str, list[int | str]] = {}
    for name, ta, tb in zip(bundle.output_names, oa, ob):
        dims: list[int | str] = []
        for da, db in zip(ta.shape, tb.shape):
            dims.append("batch" if (da, db) == (a.batch, b.batch) else "seq" if (da, db) == (a.seq, b.seq) else int(da))
        out[name] = dims
    return out


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is not a Kiln engine: no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is unreadable or corrupted: {e}") from e
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise ArtifactError(f"{path} is not a Kiln engine manifest (kind {meta.get('kind') if isinstance(meta, dict) else None!r})")
    if meta.get("schema_version") != SCHEMA:
        raise ArtifactError(f"{path} has schema_version {meta.get('schema_version')!r}; this Kiln reads {SCHEMA}")
    return meta


def check_artifact(directory: Path) -> dict[str, Any]:
    """The manifest, once every listed file exists with its recorded sha256 and the libraries match."""
    directory = Path(directory)
    meta = read_manifest(directory)
    files = meta.get("files") or {}
    if not files:
        raise ArtifactError(f"{directory}: the manifest lists no files")
    for name, digest in files.items():
        p = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{directory}: the manifest names a file outside the engine: {name}")
        if not p.is_file():
            raise ArtifactError(f"{directory}: {name} is missing")
        if sha256(p) != digest:
            raise ArtifactError(f"{directory}: {name} does not match its sha256 in the manifest (tampered or truncated)")
    want, have = meta.get("requires", {}), _requires(meta["backend"])
    wrong = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
    if wrong:
        raise ArtifactError(f"{directory}: built with " + ", ".join(f"{k} {v}" for k, (v, _) in wrong.items()) +
                            "; this machine has " + ", ".join(f"{k} {h}" for k, (_, h) in wrong.items()) + ": rebuild it")
    return meta


def load(directory: str | Path, device: str | None = None) -> CompiledModel:
    """An engine from its directory, after check_artifact; needs none of the model's code."""
    directory = Path(directory)
    meta = check_artifact(directory)
    return registry.get(meta["backend"]).load(directory, device or meta["device"]["type"])


def _reference(directory: Path) -> dict[str, Any]:
    data = torch.load(directory / REFERENCE, weights_only=True)  # tensors only; hashed before this
    if not isinstance(data, dict) or "inputs" not in data or "outputs" not in data:
        raise ArtifactError(f"{directory / REFERENCE} is not a Kiln reference file")
    return data


def verify(directory: str | Path, device: str | None = None) -> Comparison:
    """Reload the engine and compare it again with the eager outputs stored at build, under the tolerance applied then."""
    directory = Path(directory)
    model = load(directory, device)
    meta = read_manifest(directory)
    ref = _reference(directory)
    tol = {o: Tolerance(**t) for o, t in meta["verdict"]["tolerances"].items()}
    comp = Comparator(Precision(meta["precision"]), meta["model"]["task"], tol)
    for x, y in zip(ref["inputs"], ref["outputs"]):
        out = model({k: v.to(model.device) for k, v in x.items()})
        comp.add(out, y, y, None, x.get("attention_mask"))
    return comp.result()


@dataclass
class BuildOutcome:
    backend: str
    precision: str
    path: Path
    status: str  # built | reused | failed | unavailable | unsupported | mismatch
    reason: str = ""


def _valid(directory: Path, key: str) -> bool:
    try:
        return check_artifact(directory).get("cache_key") == key
    except ArtifactError:
        return False


def build(model: str | Path | ModelBundle, backends: Sequence[str] | str, precisions: Sequence[str] | str = ("fp32",),
          shapes: Sequence[str] | str = ("1x128", "8x128"), root: str | Path = "artifacts", device: str | None = None,
          options: dict[str, dict[str, Any]] | None = None, progress: Progress | None = None,
          cache_dir: str | Path | None = None, warmup: int = 3, rounds: int = 10) -> list[BuildOutcome]:
    say = progress or (lambda _m: None)
    cfg = make_config(backends=backends, precisions=precisions, shapes=shapes, device=device, options=options,
                      warmup=warmup, rounds=rounds)
    requested = [n.strip() for n in (backends.split(",") if isinstance(backends, str) else backends) if n.strip()]
    bundle = model if isinstance(model, ModelBundle) else load_model(model)
    say(f"capturing {bundle.name}")
    captured = capture(bundle, cache_dir)
    home = Path(root) / bundle.name
    keys = {(b, p): cache_key(captured, b, p, cfg.options[b].build_options(), cfg.device, cfg.shapes)
            for b in requested for p in cfg.precisions}
    outcomes, todo = [], []
    for (b, p), key in keys.items():
        target = home / f"{b}-{p.value}"
        if _valid(target, key):
            say(f"{b} {p}: reusing {target} (same graph, options, device and libraries)")
            outcomes.append(BuildOutcome(b, p.value, target, "reused", f"cache key {key}"))
        else:
            todo.append((b, p))
    if not todo:
        return outcomes
    home.mkdir(parents=True, exist_ok=True)
    for stale in home.glob(".staging-*"):  # an earlier build that was interrupted
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=home))
    try:
        cfg.backends = list(dict.fromkeys(["eager", *(b for b, _ in todo)]))
        cfg.save_engines = staging
        report = Runner(bundle, cfg, say, Path(cache_dir) if cache_dir else None).run(captured)
        dims = _dims(bundle)
        small = min(cfg.shapes, key=lambda s: s.batch * s.seq)
        inputs = [make_inputs(bundle, small, k, seed=i) for i, k in enumerate(("text", "padded"))]
        with torch.no_grad():
            outputs = [dict(zip(bundle.output_names, bundle.module(**x))) for x in inputs]
        for b, p in todo:
            rows = [r for r in report.results if r.backend == b and r.precision == p.value]
            src, target = staging / f"{b}-{p.value}", home / f"{b}-{p.value}"
            if not rows or rows[0].status not in ("ok", "mismatch") or not (src / ENGINE_META).is_file():
                status = rows[0].status if rows else "failed"
                reason = (rows[0].reason if rows else "") or "the engine was not saved"
                outcomes.append(BuildOutcome(b, p.value, target, status, reason))
                continue
            torch.save({"inputs": inputs, "outputs": outputs}, src / REFERENCE)
            manifest = _manifest(bundle, captured, b, p, cfg.device, cfg.options[b].build_options(), keys[(b, p)], dims, rows, src)
            atomic_write(src / MANIFEST, json.dumps(manifest, indent=2, default=str))
            _swap_in(src, target)
            status = "built" if rows[0].status == "ok" else "mismatch"
            say(f"{b} {p}: {status} {target}")
            outcomes.append(BuildOutcome(b, p.value, target, status, rows[0].reason))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return outcomes


def _swap_in(src: Path, target: Path) -> None:
    """Rename a complete engine directory into place; an older one is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(src, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _manifest(bundle: ModelBundle, captured: Captured, backend: str, precision: Precision, device: str, options: dict[str, Any],
              key: str, dims: dict[str, list[int | str]], rows: list[Any], src: Path) -> dict[str, Any]:
    first = rows[0]
    tolerances = {o["name"]: {"atol": o["atol"], "rtol": o["rtol"], "min_cosine": o["min_cosine"],
                              "min_agreement": o["min_agreement"] if o["min_agreement"] is not None else 0.0, "shadow_factor": 1.0}
                  for o in (first.comparison or {}).get("outputs", [])}
    files = {p.name: sha256(p) for p in sorted(src.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {
        "kind": KIND, "schema_version": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": bundle.name, "graph_hash": captured.graph_hash, "task": bundle.task, "source": bundle.source},
        "backend": backend, "precision": precision.value, "device": _device_info(device), "requires": _requires(backend),
        "versions": {d: _version(d) for d in ("torch", "onnxruntime", "tensorrt", "torch-tensorrt", "onnx")},
        "inputs": {n: {"dtype": str(s.dtype).removeprefix("torch."), "dims": list(s.dims), "high": s.high}
                   for n, s in bundle.inputs.items()},
        "outputs": {n: {"dims": dims[n], "dtype": first.describe.get("output_dtypes", {}).get(n, "float32")}
                    for n in bundle.output_names},
        "axis_ranges": {k: list(v) for k, v in bundle.axis_ranges.items()},
        "build_options": options, "cache_key": key, "files": files,
        "verdict": {"status": first.status, "verdict": first.verdict, "reason": first.reason,
                    "max_abs": max((r.max_abs or 0.0) for r in rows), "tolerances": tolerances},
        "benchmark": {r.shape: {"median_ms": (r.latency_ms or {}).get("median"), "speedup": (r.speedup or {}).get("value")}
                      for r in rows},
        "describe": first.describe,
    }
