"""Files written whole or not at all, content hashes, and the one cache-key scheme every cache uses."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write(path: Path, text: str | bytes) -> Path:
    """Write to a temporary file beside `path`, fsync, then rename: readers see the old file or the new, never half."""
    data = text.encode() if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """The directory twin of atomic_write: build into a hidden directory beside `final`, then
    rename it into place whole. If another process got there first, theirs is kept; on an
    error nothing is left behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)


def safe_name(name: str) -> str:
    """A name used as one directory under a root: never a path that leaves it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        from .errors import InputError

        raise InputError(f"{name!r} cannot name a directory under the artifacts root (it would leave it); "
                         f"give the model directory by its own name, e.g. a/b/model rather than a/b/model/..")
    return name


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(parts: Mapping[str, Any], length: int = 16) -> str:
    """A stable hash of JSON-able parts (keys sorted): what every cache key is made of."""
    blob = json.dumps(dict(parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def cache_entry(root: Path, kind: str, label: str, parts: Mapping[str, Any]) -> Path:
    """The one cache-key scheme: `root/kind/<label>-<digest of parts>`. The label is for people
    (graph hash, precision, shape); the parts are everything that changes what the entry holds
    (build options, device, library versions), so a change of any of them gets a fresh entry."""
    return root / kind / f"{label}-{digest(parts)}"
