"""A model directory read before anything is loaded from it: its config's sizes, what holding the
model would cost this machine, and its safetensors headers. A hostile or broken directory (a
size of -1, "32" as a string, a vocabulary of 1e12, a truncated weight file) is one line naming
what is wrong, before transformers allocates anything; `num_hidden_layers: 100000` was still
allocating after five minutes. Plain json and file reads: no torch, so the CLI checks it at once."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputError

# Config keys that are sizes: each, where present and not null, a positive integer (or a list of them).
SIZES = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size", "max_position_embeddings",
         "num_key_value_heads", "n_embd", "n_layer", "n_head", "n_positions", "n_inner", "n_ctx", "dim", "n_layers", "n_heads",
         "hidden_dim", "d_model", "d_ff", "d_kv", "num_layers", "num_heads", "embedding_size", "embed_dim", "image_size",
         "patch_size", "num_channels", "depths", "ffn_dim", "encoder_layers", "decoder_layers", "head_dim", "num_labels"}
# Names of the embedding tables whose rows a config counts: the weights must hold what it says.
_TABLES = {("word_embeddings.weight", "wte.weight", "embed_tokens.weight", "shared.weight"): ("vocab_size",),
           ("position_embeddings.weight", "wpe.weight"): ("max_position_embeddings", "n_positions")}
COPIES = 5  # what a run holds at once: the fp32 module, its fp64 shadow (twice the bytes), two engines' own copies


def _configs(config: dict[str, Any], where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield where, config
    for key, value in config.items():
        if isinstance(value, dict):  # text_config, vision_config, ...
            yield from _configs(value, f"{where}{key}.")


def _size(config: dict[str, Any], *keys: str, default: int = 0) -> int:
    for k in keys:
        if isinstance(config.get(k), int):
            return int(config[k])
    return default


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable); None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def parameters(config: dict[str, Any]) -> int:
    """A transformer's parameter count from its config, roughly: embeddings plus, per layer,
    attention (4 H^2) and the feed-forward block (2 H I)."""
    h = _size(config, "hidden_size", "n_embd", "d_model", "dim", "embed_dim")
    layers = _size(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers") + _size(config, "decoder_layers")
    inner = _size(config, "intermediate_size", "n_inner", "d_ff", "hidden_dim", "ffn_dim", default=4 * h)
    tables = _size(config, "vocab_size") + _size(config, "max_position_embeddings", "n_positions")
    return tables * h + layers * (4 * h * h + 2 * h * inner)


def _check_sizes(path: Path, config: dict[str, Any]) -> None:
    for where, part in _configs(config):
        for key in sorted(SIZES & set(part)):
            value = part[key]
            values = value if isinstance(value, list) else [value]
            if value is None or (isinstance(value, list) and not value):
                continue
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise InputError(f"{path / 'config.json'}: {where}{key} is {value!r}, not a positive integer")


def _check_memory(path: Path, config: dict[str, Any]) -> None:
    n = max(parameters(part) for _, part in _configs(config))
    need, have = COPIES * 4 * n, available_memory()
    if have is not None and need > have:
        raise InputError(f"{path}: its config describes about {n / 1e9:.3g} billion parameters; a run holds about {COPIES} copies "
                         f"of their fp32 bytes ({need / 2**30:.1f} GiB) and this machine has {have / 2**30:.1f} GiB available")


def _safetensors_header(file: Path) -> dict[str, Any]:
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{file} is truncated: {size} bytes, not even a safetensors header")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, 100 * 2**20):
            raise InputError(f"{file} is truncated or not safetensors: its header claims {n} bytes of a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise InputError(f"{file}: its safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{file}: its safetensors header is not a table of tensors")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
               and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2), default=0)
    if 8 + n + end > size:
        raise InputError(f"{file} is truncated: {size} bytes, where its header describes {8 + n + end}")
    return header


def _check_weights(path: Path, config: dict[str, Any]) -> None:
    for file in sorted(path.glob("*.safetensors")):
        header = _safetensors_header(file)
        for name, t in header.items():
            shape = t.get("shape") if isinstance(t, dict) else None
            if not isinstance(shape, list) or not shape:
                continue
            for suffixes, keys in _TABLES.items():
                want = next((config[k] for k in keys if isinstance(config.get(k), int)), None)
                if name.endswith(suffixes) and want is not None and shape[0] != want:
                    raise InputError(f"{path}: config.json says {keys[0]} {want}, but {file.name}'s {name} holds {shape[0]} rows")


def check_model_dir(path: str | Path) -> None:
    """Refuses, in one line, a directory whose config or weights would fail or overwhelm loading."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise InputError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{cfg} is unreadable: {e}") from None
    if not isinstance(config, dict):
        raise InputError(f"{cfg} is not a JSON object")
    _check_sizes(path, config)
    _check_memory(path, config)
    _check_weights(path, config)
