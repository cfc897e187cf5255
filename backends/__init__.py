"""The backend registry. Adding a backend is one file plus one line in BUILTIN, or an entry point
in the group `kiln.backends` naming a Backend subclass. Duplicate names are refused.

Names and a first availability (the libraries' package metadata, a CUDA device node) are known
without importing any backend, so `kiln backends` and argument checks never load torch; `get()`
imports the backend and its `availability()` is the deep check."""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import TYPE_CHECKING, Any

from pipeline.errors import UnknownChoiceError

if TYPE_CHECKING:
    from .base import Availability, Backend, BackendOptions, CompiledModel, EngineSpec


@dataclass(frozen=True)
class Entry:
    """A built-in backend as the registry knows it before importing it: where its class is, the
    distributions it needs (any one of each group), where it runs, what it compiles at. A test keeps
    devices and precisions equal to the class's own."""

    target: str
    needs: tuple[tuple[str, ...], ...] = (("torch",),)
    devices: tuple[str, ...] = ("cpu", "cuda")
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int8-dynamic")
    cpu_compiler: bool = False  # generates C++ on the CPU: needs gcc (or cc, g++) on the PATH


BUILTIN = {
    "eager": Entry("backends.eager:EagerBackend"),
    "inductor": Entry("backends.inductor:InductorBackend", cpu_compiler=True),
    "onnxruntime": Entry("backends.ort:OrtBackend", needs=(("onnxruntime", "onnxruntime-gpu"),),
                         precisions=("fp32", "fp16", "int8", "int8-dynamic")),
    "openvino": Entry("backends.openvino:OpenVinoBackend", needs=(("openvino",), ("nncf",)), devices=("cpu",)),
    "tvm": Entry("backends.tvm:TvmBackend", needs=(("apache-tvm",),), precisions=("fp32", "fp16")),
    "tensorrt": Entry("backends.tensorrt.engine:TensorRTBackend", needs=(("tensorrt",),), devices=("cuda",),
                      precisions=("fp32", "fp16", "bf16", "int8")),
    "torch-tensorrt": Entry("backends.tensorrt.torch_trt:TorchTensorRTBackend", needs=(("torch-tensorrt",),),
                            devices=("cuda",), precisions=("fp32", "fp16", "bf16")),
}

_REGISTRY: dict[str, Backend] = {}
_loaded = False  # the built-in and entry-point backends, loaded on first use (after any register() before it)


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY:
        raise ValueError(f"a backend named {backend.name!r} is already registered ({type(_REGISTRY[backend.name]).__name__})")
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, entry in BUILTIN.items():
        module, cls = entry.target.split(":")
        register(getattr(importlib.import_module(module), cls)())
    for ep in entry_points(group="kiln.backends"):
        register(ep.load()())


def get(name: str) -> Backend:
    _load_all()
    if name not in _REGISTRY:
        raise UnknownChoiceError("backend", name, _REGISTRY)
    return _REGISTRY[name]


def resolve(name: str, cls_path: tuple[str, str] | None) -> Backend:
    """The registered backend, or, for one registered at run time in another process (a worker's
    parent), a new one of its class by import path."""
    if name in names() or cls_path is None:
        return get(name)
    cls: Any = importlib.import_module(cls_path[0])
    for part in cls_path[1].split("."):
        cls = getattr(cls, part)
    return cls()  # type: ignore[no-any-return]


def names() -> list[str]:
    _load_all()
    return list(_REGISTRY)


def libraries() -> list[str]:
    """The distributions every registered backend's engines need, for a report's environment."""
    return list(dict.fromkeys(d for n in names() for d in get(n).requires))


def plugins() -> dict[str, str]:
    """Entry-point backends by name, as `module:Class`, read from package metadata without importing them."""
    return {ep.name: ep.value for ep in entry_points(group="kiln.backends")}


def known_names() -> list[str]:
    """Every backend name, without importing any: built-in, installed plugins, registered at run time."""
    return list(dict.fromkeys([*BUILTIN, *plugins(), *_REGISTRY]))


def check_name(name: str) -> None:
    if name not in known_names():
        raise UnknownChoiceError("backend", name, known_names())


def cuda_present() -> bool:
    """An NVIDIA device node or driver entry: device discovery without loading a CUDA library."""
    gpus = "/proc/driver/nvidia/gpus"
    return os.path.exists("/dev/nvidia0") or (os.path.isdir(gpus) and bool(os.listdir(gpus)))


def _installed(dist: str) -> bool:
    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


def quick_availability(name: str, device: str) -> str:
    """'available' or 'unavailable: <reasons>' from package metadata and device nodes alone. A
    library can be installed and still fail to load: `kiln backends --probe` imports each one."""
    entry = BUILTIN.get(name)
    if entry is None:
        if name in _REGISTRY:  # registered at run time: already imported, so its own check costs nothing more
            return str(_REGISTRY[name].availability(device))
        return f"a plugin ({plugins()[name]}): kiln backends --probe loads it"
    reasons = [f"{' or '.join(group)} is not installed" for group in entry.needs if not any(map(_installed, group))]
    kind = device.split(":")[0]
    if kind == "cpu" and entry.cpu_compiler and not any(shutil.which(c) for c in ("gcc", "cc", "g++")):
        reasons.append("its CPU code generation needs a C++ compiler (gcc) on the PATH")
    if kind not in entry.devices:
        reasons.append(f"{name} runs on {', '.join(entry.devices)}, not {kind}")
    elif kind == "cuda" and not cuda_present():
        reasons.append("no CUDA device")
    return "unavailable: " + "; ".join(reasons) if reasons else "available"


def __getattr__(name: str) -> Any:
    """The contract's classes, imported on first use: `backends.Backend` and friends load torch."""
    if name in ("Availability", "Backend", "BackendOptions", "CompiledModel", "EngineSpec"):
        return getattr(importlib.import_module(".base", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Availability", "Backend", "BackendOptions", "CompiledModel", "EngineSpec", "check_name", "get", "known_names",
           "names", "quick_availability", "register", "unregister"]
