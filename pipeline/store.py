"""The one on-disk format of an engine: a directory of the backend's files and one `manifest.json`.

A backend's `save` writes its files and the manifest's engine part: which backend, precision and
device, the library versions it requires, what its loader needs, and the sha256 of every file.
`kiln build` adds what it measured (`reference.pt`, the verdict, tolerances and speed, the model's
inputs and outputs) with `seal`, which hashes the files again. A directory is staged under a
hidden name and installed whole, so an interrupted build leaves nothing that a load accepts.
Loading checks the manifest, every hash and the library versions before a backend opens
anything (a .so or .pt2 runs code when loaded).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .compare import Comparator, Comparison
from .env import device_info
from .errors import ArtifactError
from .fsutil import atomic_write, exchange, left_by_dead, lock, sha256
from .precision import Precision, Tolerance

if TYPE_CHECKING:
    from backends.base import CompiledModel

MANIFEST, REFERENCE, KIND, SCHEMA = "manifest.json", "reference.pt", "kiln-engine", 2
SIGNATURE = "model.sig"  # pipeline.signing writes it; it is never one of the engine's own files
SEAL = "manifest_sha256"  # the manifest's own digest, over every other field: an edited manifest is refused
_OLD_META = "engine.json"  # schema 1 kept a second metadata file beside the manifest


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _hashes(directory: Path) -> dict[str, str]:
    """Every file under `directory` (a generation artifact holds its steps' engine directories) by
    its relative path, but the manifest and signature at the top."""
    found = sorted(directory.rglob("*"))
    links = [p.relative_to(directory).as_posix() for p in found if p.is_symlink()]
    if links:
        raise ArtifactError(f"{directory}: {', '.join(links)} are symbolic links; an engine holds its own files")
    return {p.relative_to(directory).as_posix(): sha256(p) for p in found
            if p.is_file() and p.relative_to(directory).as_posix() not in (MANIFEST, SIGNATURE)}


def write_engine_manifest(directory: Path, backend: str, precision: Precision, device: str, requires: dict[str, str],
                          engine: dict[str, Any]) -> Path:
    """The manifest a backend's save writes: enough to load the engine, and the hash of every file."""
    meta = {"kind": KIND, "schema_version": SCHEMA, "created": _now(), "backend": backend, "precision": precision.value,
            "device": device_info(device), "requires": requires, "engine": engine}
    return _write(directory, meta)


def write_generation_manifest(directory: Path, backend: str, precision: Precision, device: str, requires: dict[str, str],
                              sections: dict[str, Any]) -> Path:
    """A generation artifact's manifest: its backend, precision, device and libraries like an
    engine's, what `kiln build --mode generate` measured, and the hash of every file, the steps'
    engine directories included."""
    meta = {"kind": KIND, "schema_version": SCHEMA, "created": _now(), "backend": backend, "precision": precision.value,
            "device": device_info(device), "requires": requires, **sections}
    return _write(directory, meta)


def seal(directory: Path, sections: dict[str, Any]) -> Path:
    """Adds what a build measured to an engine's manifest and hashes its files again (reference.pt included)."""
    return _write(directory, {**read_manifest(directory), **sections})


def _write(directory: Path, meta: dict[str, Any]) -> Path:
    """The manifest with the hash of every file beside it, written whole."""
    return rewrite(directory, {**meta, "files": _hashes(directory)})


def _seal(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str, allow_nan=False).encode()).hexdigest()


def rewrite(directory: Path, meta: dict[str, Any]) -> Path:
    """`meta` written as the manifest, sealed with its own digest (the files are not hashed again).
    The seal catches a manifest edited by hand or by a tool; whoever rewrites it on purpose can
    seal it again, which only a signature (kiln sign) rules out."""
    try:  # a NaN or Inf never reaches a manifest: JSON has no such number, and a reader would trust it
        meta = {**json.loads(json.dumps(meta, default=str, allow_nan=False)), SEAL: ""}
        meta[SEAL] = _seal(meta)
        text = json.dumps(meta, indent=2, allow_nan=False)
    except ValueError as e:
        raise ArtifactError(f"{directory}: a value is not a finite number, so nothing is written ({e})") from e
    return atomic_write(directory / MANIFEST, text)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        if (directory / _OLD_META).is_file():
            raise ArtifactError(f"{directory} was built by an older Kiln (schema 1: {_OLD_META}, no {MANIFEST}), rebuild it") from None
        raise ArtifactError(f"{directory} is not a Kiln engine: no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is unreadable or corrupted: {e}") from e
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise ArtifactError(f"{path} is not a Kiln engine manifest (kind {meta.get('kind') if isinstance(meta, dict) else None!r})")
    schema = meta.get("schema_version")
    if isinstance(schema, int) and schema < SCHEMA:
        raise ArtifactError(f"{directory} was built by an older Kiln (schema {schema}), rebuild it")
    if schema != SCHEMA:
        raise ArtifactError(f"{path} has schema_version {schema!r}; this Kiln reads {SCHEMA}: upgrade Kiln or rebuild it")
    if SEAL not in meta:
        raise ArtifactError(f"{path} carries no seal (written by an older Kiln): rebuild it")
    if meta[SEAL] != _seal(meta):
        raise ArtifactError(f"{path} was changed after it was written (its {SEAL} does not match its fields): rebuild the "
                            f"engine; sign artifacts (kiln sign) to know who wrote them")
    for key, kind in (("backend", str), ("precision", str), ("device", dict), ("requires", dict), ("files", dict)):
        if not isinstance(meta.get(key), kind):
            raise ArtifactError(f"{path}: its {key!r} is {meta.get(key)!r}, not a {kind.__name__}: rebuild it")
    if meta["precision"] not in {p.value for p in Precision}:
        raise ArtifactError(f"{path}: unknown precision {meta['precision']!r}: rebuild it")
    return meta


def check_files(directory: Path, meta: dict[str, Any]) -> None:
    """Every file the manifest lists (every file a loader opens) is a regular file inside the
    directory, not a link, with its recorded sha256."""
    files = meta.get("files") or {}
    if not files:
        raise ArtifactError(f"{directory}: the manifest lists no files")
    if directory.is_symlink():
        raise ArtifactError(f"{directory} is a symbolic link; an engine directory must be the directory itself")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ArtifactError(f"{directory}: the manifest's files are not a table of names and sha256 digests")
    for name, digest in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{directory}: the manifest names a file outside the engine: {name}")
        p = directory / name
        if p.is_symlink():
            raise ArtifactError(f"{directory}: {name} is a symbolic link; engine files must be in the directory itself")
        if not p.is_file():
            raise ArtifactError(f"{directory}: {name} is missing")
        if sha256(p) != digest:
            raise ArtifactError(f"{directory}: {name} does not match its sha256 in the manifest (tampered or truncated)")
    extra = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if (p.is_file() or p.is_symlink()) and p.relative_to(directory).as_posix() not in {*files, MANIFEST, SIGNATURE})
    if extra:  # a loader (a tokenizer's, say) may open files it finds: the directory holds what was checked, nothing else
        raise ArtifactError(f"{directory}: {', '.join(extra[:5])} {'is' if len(extra) == 1 else 'are'} not in the manifest; "
                            f"an engine directory holds only the files it lists: remove {'it' if len(extra) == 1 else 'them'} or rebuild")


def check_requires(directory: Path, meta: dict[str, Any], have: dict[str, str]) -> None:
    """The libraries the engine was built with are the ones here, at the granularity its backend pins."""
    want = meta.get("requires", {})
    wrong = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
    if wrong:
        raise ArtifactError(f"{directory}: built with " + ", ".join(f"{k} {v}" for k, (v, _) in wrong.items()) +
                            "; this machine has " + ", ".join(f"{k} {h}" for k, (_, h) in wrong.items()) + ": rebuild it")


def require_build(directory: Path, meta: dict[str, Any], verb: str) -> None:
    """What `verb` needs is an artifact `kiln build` installed, not an engine `kiln run --save-engines` left."""
    if not meta.get("verdict") or not meta.get("model") or not (directory / REFERENCE).is_file():
        raise ArtifactError(f"{directory} is an engine `kiln run --save-engines` left: no build verdict, model or reference "
                            f"inputs, which {verb} needs; build an artifact with kiln build --backends {meta.get('backend')} "
                            f"--precisions {meta.get('precision')}")


def check_artifact(directory: str | Path) -> dict[str, Any]:
    """The manifest, once every listed file matches its hash and the libraries match."""
    import backends as registry

    directory = Path(directory)
    meta = read_manifest(directory)
    check_files(directory, meta)
    check_requires(directory, meta, registry.get(meta["backend"]).pinned())
    return meta


def load(directory: str | Path, device: str | None = None, allow_failed: bool = False,
         public_key: str | Path | None = None) -> CompiledModel:
    """An engine from its directory, checked first; needs none of the model's code. With
    `public_key`, its signature is checked before anything else. An engine whose recorded verdict
    is not a pass is refused unless `allow_failed`."""
    import backends as registry

    if public_key is not None:
        from .signing import check_signature

        check_signature(directory, public_key)
    meta = read_manifest(directory)
    if meta.get("mode") == "generate":
        raise ArtifactError(f"{directory} is a generation artifact (prefill and decode steps): load it with "
                            f"pipeline.load_generation, answer with kiln predict")
    verdict = (meta.get("verdict") or {}).get("status", "pass")
    if verdict != "pass" and not allow_failed:
        raise ArtifactError(f"{directory}: its build verdict is {verdict!r} ({(meta.get('verdict') or {}).get('reason', '')}); "
                            f"load it anyway with allow_failed=True (kiln load --allow-failed)")
    return registry.get(meta["backend"]).load(directory, device)


def is_current(directory: Path, cache_key: str) -> bool:
    """A whole, verified engine that passed at every shape, built from the same inputs (same cache key): safe to reuse."""
    with lock(directory):
        recover(directory)
    try:
        meta = check_artifact(directory)
    except ArtifactError:
        return False
    return meta.get("cache_key") == cache_key and (meta.get("verdict") or {}).get("status") == "pass"


def recover(target: Path) -> None:
    """A kill between install's two renames leaves the target missing and the previous engine moved
    aside by a process that no longer runs: put it back (or drop it, if a newer one is in place)."""
    for old in sorted(target.parent.glob(f".old-*-{target.name}")):
        if not left_by_dead(old, ".old-"):
            continue
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)


def install(src: Path, target: Path) -> None:
    """Put a complete engine directory in place of `target`: swapped with the older one in one step
    where the file system can (a reader finds the old engine or the new, never none), else the
    older one moved aside first and removed after. Installs into one target take turns; a kill
    between those two renames is undone by `recover`."""
    with lock(target):
        recover(target)
        if target.exists() and exchange(src, target):
            shutil.rmtree(src, ignore_errors=True)  # the older engine, now under the staging name
            return
        old = None
        if target.exists():
            old = target.with_name(f".old-{os.getpid()}-{target.name}")
            os.replace(target, old)
        os.replace(src, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_reference(directory: Path, shapes: dict[str, tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]],
                    task: list[bool] | None = None) -> Path:
    """Every built shape's input batches and eager fp32 outputs, for `kiln verify`; `task`: which
    batches count for task agreement (References.judge's choice), the same at every shape."""
    path = directory / REFERENCE
    data: dict[str, Any] = {"shapes": {s: {"inputs": i, "outputs": o} for s, (i, o) in shapes.items()}}
    if task is not None:
        data["task"] = [bool(t) for t in task]
    torch.save(data, path)
    return path


def read_reference(directory: str | Path) -> dict[str, dict[str, list[dict[str, torch.Tensor]]]]:
    """{shape: {"inputs": [...], "outputs": [...]}}."""
    return read_reference_file(Path(directory))["shapes"]


def read_reference_file(directory: Path) -> dict[str, Any]:
    try:
        data = torch.load(directory / REFERENCE, weights_only=True)  # tensors only; hashed before this
    except Exception as e:  # a crafted pickle is refused by weights_only: say so, in one line
        raise ArtifactError(f"{directory / REFERENCE} is not a Kiln reference file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), dict):
        raise ArtifactError(f"{directory / REFERENCE} is not a Kiln reference file")
    return data


@dataclass
class Verification:
    """An engine checked again at every shape it was built for, each under the tolerances applied then."""

    shapes: dict[str, Comparison]

    @property
    def passed(self) -> bool:
        return bool(self.shapes) and all(c.passed for c in self.shapes.values())

    def __bool__(self) -> bool:
        return self.passed

    @property
    def batches(self) -> int:
        return sum(c.batches for c in self.shapes.values())

    @property
    def reason(self) -> str:
        shown = [(s, c) for s, c in self.shapes.items() if not c.passed] or list(self.shapes.items())
        return "; ".join(f"at {s}: {c.reason}" for s, c in shown)


def verify(directory: str | Path, device: str | None = None, public_key: str | Path | None = None) -> Verification:
    """Reload the engine and compare it again with the eager outputs stored at build, at every
    recorded shape, under the tolerances applied at that shape."""
    directory = Path(directory)
    model = load(directory, device, allow_failed=True, public_key=public_key)
    meta = read_manifest(directory)
    recorded = (meta.get("verdict") or {}).get("shapes") or {}
    if not recorded:
        raise ArtifactError(f"{directory} records no verdict to verify against (saved by kiln run, not built by kiln build)")
    ref = read_reference(directory)
    task = read_reference_file(directory).get("task")
    out: dict[str, Comparison] = {}
    for shape, verdict in recorded.items():
        if shape not in ref:
            raise ArtifactError(f"{directory / REFERENCE} holds no batches for the recorded shape {shape}")
        tol = {o: Tolerance.from_dict(t) for o, t in verdict["tolerances"].items()}
        comp = Comparator(Precision(meta["precision"]), meta["model"]["task"], tol)
        for i, (x, y) in enumerate(zip(ref[shape]["inputs"], ref[shape]["outputs"])):
            out_t = model({k: v.to(model.device) for k, v in x.items()})
            comp.add(out_t, y, y, None, x.get("attention_mask"), task=task[i] if task and i < len(task) else True)
        out[shape] = comp.result()
    return Verification(out)
