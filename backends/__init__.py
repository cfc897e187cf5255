"""The backend registry. Adding a backend is one file plus one line in BUILTIN, or an entry point
in the group `kiln.backends` naming a Backend subclass. Duplicate names are refused."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from pipeline.errors import UnknownChoiceError

from .base import Availability, Backend, BackendOptions, CompiledModel, EngineSpec

BUILTIN = {
    "eager": "backends.eager:EagerBackend",
    "inductor": "backends.inductor:InductorBackend",
    "onnxruntime": "backends.ort:OrtBackend",
    "tvm": "backends.tvm:TvmBackend",
    "tensorrt": "backends.tensorrt.engine:TensorRTBackend",
    "torch-tensorrt": "backends.tensorrt.torch_trt:TorchTensorRTBackend",
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
    for name, target in BUILTIN.items():
        module, cls = target.split(":")
        register(getattr(importlib.import_module(module), cls)())
    for ep in entry_points(group="kiln.backends"):
        register(ep.load()())


def get(name: str) -> Backend:
    _load_all()
    if name not in _REGISTRY:
        raise UnknownChoiceError("backend", name, _REGISTRY)
    return _REGISTRY[name]


def names() -> list[str]:
    _load_all()
    return list(_REGISTRY)


__all__ = ["Availability", "Backend", "BackendOptions", "CompiledModel", "EngineSpec", "get", "names", "register", "unregister"]
