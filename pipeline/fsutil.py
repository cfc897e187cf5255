"""Files written whole or not at all, content hashes, and the one cache-key scheme every cache uses."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock


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


ENTRY = ".kiln-entry.json"  # the sha256 of every file of a cache entry, written last


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def left_by_dead(path: Path, prefix: str) -> bool:
    """Whether `<prefix><pid>-...` was left by a process that no longer runs (a kill -9)."""
    pid = path.name[len(prefix):].split("-", 1)[0]
    return path.name.startswith(prefix) and pid.isdigit() and not pid_alive(int(pid))


def clean_stale(parent: Path, prefix: str) -> None:
    """Removes `<prefix><pid>-*` directories left by processes that no longer run."""
    for d in parent.glob(f"{prefix}*"):
        if left_by_dead(d, prefix):
            shutil.rmtree(d, ignore_errors=True)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """The directory twin of atomic_write: build into a hidden directory beside `final` (named
    with this process's id, so a stale one is known), record every file's sha256, then rename it
    into place whole. If another process got there first, theirs is kept; on an error nothing is
    left behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".staged-{os.getpid()}-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file() and not p.is_symlink()}
        atomic_write(tmp / ENTRY, json.dumps({"files": files}, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)


def entry_valid(final: Path) -> bool:
    """A cache entry that was completed (its file list written last) and whose files still hash to it."""
    try:
        files = json.loads((final / ENTRY).read_text())["files"]
        return bool(files) and all(sha256(final / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def lock(path: Path, wait_s: float = 7200.0) -> FileLock:
    """An inter-process lock beside `path`: two builds or tunings of one entry take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.parent / f".{path.name}.lock"), timeout=wait_s)


def cached_dir(final: Path, make: Callable[[Path], None]) -> Path:
    """The cache entry `final`, made by `make(tmp)` unless a whole, hash-checked one exists.
    Concurrent callers take turns; an entry left half-made or altered is made again."""
    with lock(final):
        clean_stale(final.parent, ".staged-")
        if entry_valid(final):
            return final
        shutil.rmtree(final, ignore_errors=True)
        with staged_dir(final) as tmp:
            make(tmp)
    return final


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


def check_writable(path: str | Path, what: str, *, directory: bool = True, min_free_mb: float = 16.0) -> Path:
    """Refuses, before any work, a place a job could not write: `path` (a directory, or with
    `directory=False` a file) must be creatable and writable, with `min_free_mb` free where it
    lands. Tried with a real file rather than permission bits, which root ignores and a read-only
    mount or a full disk overrides."""
    from .errors import InputError

    p = Path(path)
    if directory and p.exists() and not p.is_dir():
        raise InputError(f"{what} {p} is a file, not a directory: give a directory (it is created if missing)")
    if not directory and p.is_dir():
        raise InputError(f"{what} {p} is a directory, not a file")
    home = p if directory and p.is_dir() else p.parent
    while not home.exists():
        home = home.parent
    if not home.is_dir():
        raise InputError(f"{what} {p} lies under {home}, which is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".kiln-probe-", dir=home)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{what} {p} cannot be written ({home}: {e.strerror or e})") from None
    free = shutil.disk_usage(home).free / 2**20
    if free < min_free_mb:
        raise InputError(f"{what} {p} has {free:.0f} MB free where it lands ({home}); this job needs at least {min_free_mb:.0f} MB")
    return p


def empty_dir(root: Path) -> tuple[int, float]:
    """Everything under `root` removed, `root` kept: (files removed, their MB)."""
    files = [p for p in root.rglob("*") if p.is_file()]
    mb = sum(p.stat().st_size for p in files) / 2**20
    for child in root.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    return len(files), mb


def exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2 with RENAME_EXCHANGE), so a reader of either
    never finds it missing; False where the kernel, libc or file system cannot, and nothing moved."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
