"""Authenticity of an engine directory, with OpenSSF model-signing (a key pair, offline).

The manifest's sha256s catch corruption, truncation and mix-ups, but they sit beside the files
they describe: whoever can rewrite an engine can rewrite its manifest too. A signature over every
file of the directory, manifest included, made with a private key the attacker does not hold,
is what refuses that; `load(..., public_key=...)` checks it before anything else is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ArtifactError, InputError
from .store import SIGNATURE, check_artifact  # the signature sits inside the engine directory, outside what it signs


def _library() -> Any:
    try:
        import model_signing
    except ImportError as e:
        raise InputError(f"signing needs the model-signing package: pip install -e '.[sign]' ({e})") from e
    return model_signing


def _hashing(directory: Path) -> Any:
    return _library().hashing.Config().set_ignored_paths(paths=[directory / SIGNATURE])


def _key(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no {what} key at {p} (a PEM file; e.g. openssl ecparam -name prime256v1 -genkey -noout -out key.pem)")
    return p


def sign(directory: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Signs a checked engine directory: writes directory/model.sig over all its other files."""
    directory = Path(directory)
    check_artifact(directory)  # only a whole engine, every hash as recorded, is worth signing
    lib = _library()
    try:
        config = lib.signing.Config().use_elliptic_key_signer(private_key=_key(private_key, "private"), password=password)
        config.set_hashing_config(_hashing(directory)).sign(directory, directory / SIGNATURE)
    except (ValueError, TypeError) as e:
        raise InputError(f"cannot sign with {private_key}: {e}") from e
    return directory / SIGNATURE


def check_signature(directory: str | Path, public_key: str | Path) -> None:
    """Refuses a directory that is unsigned, or whose files (manifest included) are not what the key signed."""
    directory = Path(directory)
    if not (directory / SIGNATURE).is_file():
        raise ArtifactError(f"{directory} is not signed (no {SIGNATURE}), and a signature is required")
    lib = _library()
    try:
        config = lib.verifying.Config().use_elliptic_key_verifier(public_key=_key(public_key, "public"))
        config.set_hashing_config(_hashing(directory)).verify(directory, directory / SIGNATURE)
    except ValueError as e:
        raise ArtifactError(f"{directory}: the signature does not verify with {public_key}: {str(e)[:300]}") from e
