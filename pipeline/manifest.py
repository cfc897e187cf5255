"""The on-disk format of an engine: a directory of files and one sealed `manifest.json`.

`Manifest` is the format, typed: `from_dict` is the one schema check, `write` the one writer (it
hashes every file and seals the manifest with its own digest). Backends import this module to save
and load; the deploy verbs (load, verify, install) live in `store`, above the backends.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .fsutil import atomic_write, sha256
from .precision import Precision

MANIFEST, KIND, SCHEMA = "manifest.json", "kiln-engine", 3
SIGNATURE = "model.sig"  # pipeline.signing writes it; it is never one of the engine's own files
SEAL = "manifest_sha256"  # the manifest's own digest, over every other field: an edited manifest is refused
_OLD_META = "engine.json"  # schema 1 kept a second metadata file beside the manifest


@dataclass(frozen=True)
class ModelRecord:
    """The model an engine was built from: its name, head and captured graph."""

    name: str
    task: str
    graph_hash: str | Mapping[str, str]  # a generation artifact: one per step
    source: str = ""
    outputs: tuple[str, ...] = ()
    labels: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Verdict:
    """What the build found of the saved engine, loaded back: `status` "pass" or "mismatch", why,
    and per shape what was measured there (a forward shape keeps its tolerances, for `verify`)."""

    status: str
    reason: str = ""
    engine: str = ""
    max_abs: float | None = None
    new_tokens: int | None = None
    shapes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "pass"


# each field's JSON kind, checked by from_dict; the nested records are checked by their own fields
_KINDS: dict[str, type | tuple[type, ...]] = {
    "backend": str, "precision": str, "created": str, "mode": str, "cache_key": str, "artifact_mb": (int, float, type(None)),
    "tokenizer": list, "processor": list, "notes": list,
}


@dataclass(frozen=True)
class Manifest:
    """An engine's manifest. `engine` is the backend's own section (what its loader reads);
    `files` the sha256 of every file, written by `write`; the rest is what a build measured."""

    backend: str
    precision: Precision
    device: Mapping[str, Any]
    requires: Mapping[str, str]
    files: Mapping[str, str] = field(default_factory=dict)
    engine: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    mode: str = "forward"  # "generate": prefill and decode engine directories inside this one
    model: ModelRecord | None = None
    verdict: Verdict | None = None
    inputs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    outputs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    axis_ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    benchmark: Mapping[str, Any] = field(default_factory=dict)
    build_options: Mapping[str, Any] = field(default_factory=dict)
    cache_key: str = ""
    describe: Mapping[str, Any] = field(default_factory=dict)
    artifact_mb: float | None = None
    tokenizer: tuple[str, ...] = ()  # the preprocessor's files, saved beside the engine's for `kiln predict`
    processor: tuple[str, ...] = ()
    versions: Mapping[str, Any] = field(default_factory=dict)
    environment: Mapping[str, Any] = field(default_factory=dict)
    generation: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def built(self) -> bool:
        """Installed by `kiln build` (a verdict, a model and reference batches), not left by `kiln run --save-engines`."""
        return self.verdict is not None and self.model is not None

    @property
    def status(self) -> str:
        return self.verdict.status if self.verdict else "pass"

    def with_sections(self, **sections: Any) -> Manifest:
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": KIND, "schema_version": SCHEMA}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("backend", "precision", "device", "requires", "files") or value != _default(f):
                out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, meta: Any, where: str | Path = "manifest") -> Manifest:
        """The manifest a reader may trust the types of; anything else is one line naming the field."""
        if not isinstance(meta, dict) or meta.get("kind") != KIND:
            raise ArtifactError(f"{where} is not a Kiln engine manifest (kind {meta.get('kind') if isinstance(meta, dict) else None!r})")
        schema = meta.get("schema_version")
        if isinstance(schema, int) and schema < SCHEMA:
            raise ArtifactError(f"{where} was built by an older Kiln (schema {schema}), rebuild it")
        if schema != SCHEMA:
            raise ArtifactError(f"{where} has schema_version {schema!r}; this Kiln reads {SCHEMA}: upgrade Kiln or rebuild it")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(meta) - names - {"kind", "schema_version", SEAL})
        if unknown:
            raise ArtifactError(f"{where}: unknown field(s) {', '.join(unknown)}: written by another tool or Kiln; rebuild it")
        for f in dataclasses.fields(cls):
            required = _default(f) is dataclasses.MISSING
            if f.name in meta or required:
                want = _KINDS.get(f.name, dict if required or _default(f) == {} else object)
                if not isinstance(meta.get(f.name), want):
                    raise ArtifactError(f"{where}: its {f.name!r} is {meta.get(f.name)!r}, not a "
                                        f"{getattr(want, '__name__', 'number')}: rebuild it")
        if meta["precision"] not in {p.value for p in Precision}:
            raise ArtifactError(f"{where}: unknown precision {meta['precision']!r}: rebuild it")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta["files"].items()):
            raise ArtifactError(f"{where}: the manifest's files are not a table of names and sha256 digests")
        try:
            return cls(**{**{k: v for k, v in meta.items() if k in names},
                          "precision": Precision(meta["precision"]),
                          "model": _record(ModelRecord, meta.get("model")), "verdict": _record(Verdict, meta.get("verdict")),
                          "axis_ranges": {k: (int(v[0]), int(v[1])) for k, v in meta.get("axis_ranges", {}).items()},
                          **{k: tuple(str(x) for x in meta.get(k, ())) for k in ("tokenizer", "processor", "notes")}})
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise ArtifactError(f"{where}: a field is garbled ({type(e).__name__}: {e}): rebuild it") from None


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    if isinstance(value, Precision):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) != _default(f)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _record(cls: type, data: Any) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__.lower()} is {data!r}, not a table")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise KeyError(f"{cls.__name__.lower()} has unknown field(s) {', '.join(sorted(unknown))}")
    rec = cls(**data)
    for f in dataclasses.fields(cls):
        value = getattr(rec, f.name)
        if isinstance(_default(f), dict) and not isinstance(value, dict) or f.name in ("name", "status") and not isinstance(value, str):
            raise TypeError(f"{cls.__name__.lower()}.{f.name} is {value!r}")
    return dataclasses.replace(rec, outputs=tuple(rec.outputs)) if cls is ModelRecord else rec


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def hashes(directory: Path) -> dict[str, str]:
    """Every file under `directory` (a generation artifact holds its steps' engine directories) by
    its relative path, but the manifest and signature at the top."""
    found = sorted(directory.rglob("*"))
    links = [p.relative_to(directory).as_posix() for p in found if p.is_symlink()]
    if links:
        raise ArtifactError(f"{directory}: {', '.join(links)} are symbolic links; an engine holds its own files")
    return {p.relative_to(directory).as_posix(): sha256(p) for p in found
            if p.is_file() and p.relative_to(directory).as_posix() not in (MANIFEST, SIGNATURE)}


def write(directory: Path, manifest: Manifest) -> Path:
    """The one writer: `manifest` with the hash of every file in `directory` beside it, sealed, written whole."""
    created = manifest.created or now()
    return rewrite(directory, dataclasses.replace(manifest, created=created, files=hashes(directory)).to_dict())


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


def read(directory: str | Path) -> Manifest:
    """The manifest of an engine directory, its seal and types checked (its files are not: see check_files)."""
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
    if isinstance(meta, dict) and meta.get("kind") == KIND and meta.get("schema_version") == SCHEMA:
        if SEAL not in meta:
            raise ArtifactError(f"{path} carries no seal: rebuild it")
        if meta[SEAL] != _seal(meta):
            raise ArtifactError(f"{path} was changed after it was written (its {SEAL} does not match its fields): rebuild the "
                                f"engine; sign artifacts (kiln sign) to know who wrote them")
    return Manifest.from_dict(meta, path)


def check_files(directory: Path, manifest: Manifest) -> None:
    """Every file the manifest lists (every file a loader opens) is a regular file inside the
    directory, not a link, with its recorded sha256; and nothing else is there."""
    files = manifest.files
    if not files:
        raise ArtifactError(f"{directory}: the manifest lists no files")
    if directory.is_symlink():
        raise ArtifactError(f"{directory} is a symbolic link; an engine directory must be the directory itself")
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


def check_requires(directory: Path, manifest: Manifest, have: Mapping[str, str]) -> None:
    """The libraries the engine was built with are the ones here, at the granularity its backend pins."""
    wrong = {k: (v, have.get(k)) for k, v in manifest.requires.items() if have.get(k) != v}
    if wrong:
        raise ArtifactError(f"{directory}: built with " + ", ".join(f"{k} {v}" for k, (v, _) in wrong.items()) +
                            "; this machine has " + ", ".join(f"{k} {h}" for k, (_, h) in wrong.items()) + ": rebuild it")
