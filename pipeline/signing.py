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
from .manifest import SIGNATURE, check_files, read  # the signature sits inside the engine directory, outside what it signs


def _library() -> Any:
    try:
        import model_signing
    except ImportError as e:
        raise InputError(f"signing needs the model-signing package: pip install -e '.[sign]' ({e})") from e
    return model_signing


def _hashing() -> Any:
    """Every file but the signature, git's names included. model-signing resolves ignored paths
    against the model directory itself: the signature's name alone, never a path that would be
    joined to the directory a second time (which broke a relative ART: "Extra files found: model.sig")."""
    return _library().hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


_MAKE_KEY = "openssl ecparam -name prime256v1 -genkey -noout -out key.pem"


def _key(path: str | Path, what: str, password: str | None = None) -> Path:
    """The key file, refused in one line unless it is an elliptic-curve key model-signing's key
    signer takes (it signs with EC keys; RSA is for its certificate and PKCS#11 signers)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p = Path(path)
    if not p.is_file():
        raise InputError(f"no {what} key at {p} (a PEM file; e.g. {_MAKE_KEY})")
    try:
        data = p.read_bytes()
        key: Any = (serialization.load_pem_private_key(data, password.encode() if password else None) if what == "private"
                    else serialization.load_pem_public_key(data))
    except TypeError as e:  # a password for an unencrypted key, or none for an encrypted one
        raise InputError(f"cannot read the {what} key {p}: {e} (--password)") from None
    except ValueError as e:
        raise InputError(f"cannot read the {what} key {p}: {str(e).splitlines()[0] if str(e) else 'not a PEM key'} "
                         f"(a wrong --password, or not a PEM key)") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        raise InputError(f"{p} is an {type(key).__name__.removeprefix('_').replace('PrivateKey', '').replace('PublicKey', '')} key; "
                         f"Kiln signs with model-signing's elliptic-curve key signer: make an EC key ({_MAKE_KEY})")
    return p


def sign(directory: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Signs a checked engine directory: writes directory/model.sig over all its other files."""
    directory = Path(directory)
    check_files(directory, read(directory))  # only a whole engine, every hash as recorded, is worth signing
    lib = _library()
    key = _key(private_key, "private", password)
    try:
        # model-signing hands the password to cryptography, which takes bytes
        config = lib.signing.Config().use_elliptic_key_signer(private_key=key, password=password.encode() if password else None)
        config.set_hashing_config(_hashing()).sign(directory, directory / SIGNATURE)
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
        config.set_hashing_config(_hashing()).verify(directory, directory / SIGNATURE)
    except ValueError as e:
        raise ArtifactError(f"{directory}: the signature does not verify with {public_key}: {str(e)[:300]}") from e
