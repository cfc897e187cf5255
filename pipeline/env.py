"""The environment a run or an engine belongs to: machine, device, threads, library versions."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from collections.abc import Sequence
from typing import Any

import torch

# Kiln's own libraries; a report adds the libraries each registered backend requires.
CORE = ("torch", "transformers", "onnx", "onnxscript", "numpy")


def version(dist: str) -> str | None:
    """The installed version of a distribution, or of its `-gpu` build (which installs the same
    module under another distribution name), or None."""
    for name in (dist, f"{dist}-gpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def host_id() -> str:
    """The kind of CPU host, for choosing a baseline: its model name and the widest vector
    instructions it has. Speed ratios between backends differ between such hosts (one engine may
    use AMX or AVX-512 where another does not), so each kind keeps its own baseline."""
    flags = cpu_flags()
    isa = next((name for name, flag in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2")) if flag in flags), "generic")
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", cpu_name().lower())).strip("-")
    return f"{slug}-{isa}"


def environment(device: str = "cpu", libraries: Sequence[str] = ()) -> dict[str, Any]:
    """The machine, device and threads, and the versions of Kiln's libraries and `libraries` (the backends' own)."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(), "host": host_id(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": device, "versions": {d: version(d) for d in dict.fromkeys([*CORE, *libraries])},
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}", cuda=torch.version.cuda,
                   gpu_memory_gb=round(props.total_memory / 2**30, 1))
    return env


def device_info(device: str) -> dict[str, Any]:
    """What an engine is tied to: the device type, and the GPU's architecture or the CPU's model."""
    kind = device.split(":")[0]
    if kind == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return {"type": kind, "arch": f"sm_{props.major}{props.minor}", "name": props.name}
    cpu = cpu_name()
    return {"type": kind, "arch": cpu, "name": cpu}


def quiet_import(module: str) -> bool:
    """Imports `module` (when installed) with logging off: torchao, which transformers imports
    when it is installed, logs at import that its CUDA extensions cannot load on a CPU machine."""
    import importlib
    import logging

    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
    finally:
        logging.disable(level)
