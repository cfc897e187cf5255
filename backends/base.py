"""The backend contract: Backend, CompiledModel, Availability, options."""

from __future__ import annotations

import dataclasses
import json
import time
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from pipeline.capture import Captured
from pipeline.errors import ArtifactError, BackendError, InputError
from pipeline.inputs import Shape
from pipeline.precision import Precision

Tensors = dict[str, torch.Tensor]
ENGINE_META = "engine.json"


@dataclass(frozen=True)
class Availability:
    """ok, or the reason why not. Reads as a boolean; prints as 'available' or 'unavailable: <reason>'."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return "available" if self.ok else f"unavailable: {self.reason}"

    @classmethod
    def yes(cls) -> Availability:
        return cls(True)

    @classmethod
    def no(cls, reason: str) -> Availability:
        return cls(False, reason)


def runtime_option(default: Any) -> Any:
    """A field that only affects running an engine, not building it: kept out of the cache key."""
    return dataclasses.field(default=default, metadata={"runtime": True})


O = TypeVar("O", bound="BackendOptions")


@dataclass(frozen=True)
class BackendOptions:
    """Base of every backend's options: frozen, defaults in the dataclass only, unknown keys an error."""

    @classmethod
    def from_mapping(cls: type[O], values: Mapping[str, Any] | None = None) -> O:
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; valid: {', '.join(fields) or '(none)'}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build_options(self) -> dict[str, Any]:
        """The options that force a rebuild: everything not marked runtime_option."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("runtime")}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Strings from the command line become the field's type; anything else must already match."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if typing.get_origin(hint) is typing.Literal:
        if value not in typing.get_args(hint):
            raise InputError(f"option {name}={value!r}; valid: {', '.join(map(str, typing.get_args(hint)))}")
        return value
    if not isinstance(value, str) or str in allowed:
        return value
    if value.lower() in ("none", "null") and type(None) in allowed:
        return None
    if bool in allowed and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    for t in (int, float):
        if t in allowed:
            try:
                return t(value)
            except ValueError:
                pass
    raise InputError(f"option {name}={value!r} is not a valid {hint}")


class CompiledModel(ABC):
    """A compiled engine: named tensors in, named tensors out."""

    def __init__(self, backend: str, precision: Precision, device: str,
                 input_names: tuple[str, ...], output_names: tuple[str, ...], options: BackendOptions) -> None:
        self.backend, self.precision, self.device = backend, precision, device
        self.input_names, self.output_names, self.options = input_names, output_names, options
        self.build_s = 0.0

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> Tensors:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise InputError(f"{self.backend}: missing input(s) {', '.join(missing)}; expects {', '.join(self.input_names)}")
        return self.run({n: inputs[n] for n in self.input_names})

    @abstractmethod
    def run(self, inputs: Tensors) -> Tensors:
        """Run on inputs already on this engine's device; return outputs by name."""

    def synchronize(self) -> None:
        """Wait for queued device work; timing depends on it."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def save(self, directory: str | Path) -> list[Path]:
        """Write the deployable engine into `directory` (created); returns the files written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = self._save_files(directory)
        meta = {"backend": self.backend, "precision": self.precision.value, "device": self.device,
                "inputs": list(self.input_names), "outputs": list(self.output_names),
                "options": self.options.to_dict(), "files": [p.name for p in files], **self._extra_meta()}
        (directory / ENGINE_META).write_text(json.dumps(meta, indent=2))
        return [*files, directory / ENGINE_META]

    @abstractmethod
    def _save_files(self, directory: Path) -> list[Path]:
        ...

    def _extra_meta(self) -> dict[str, Any]:
        """Backend-specific facts its _load needs, kept in engine.json."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What the compiler actually did: kernels, fused ops, fallbacks, build time."""
        return {"build_s": round(self.build_s, 3)}


class Backend(ABC):
    name: ClassVar[str]
    precisions: ClassVar[tuple[Precision, ...]]
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    options_type: ClassVar[type[BackendOptions]] = BackendOptions

    def availability(self, device: str = "cpu") -> Availability:
        """ok, or why not; never raises."""
        kind = device.split(":")[0]
        if kind not in self.devices:
            return Availability.no(f"{self.name} does not run on {kind} (runs on {', '.join(self.devices)})")
        if kind == "cuda" and not torch.cuda.is_available():
            return Availability.no("no CUDA device")
        try:
            return self._check(device)
        except Exception as e:  # an optional library may fail to import in any way
            return Availability.no(f"{type(e).__name__}: {e}")

    def _check(self, device: str) -> Availability:
        return Availability.yes()

    def supports(self, precision: Precision, device: str) -> Availability:
        if precision not in self.precisions:
            return Availability.no(f"{self.name} supports {', '.join(p.value for p in self.precisions)}")
        return Availability.yes()

    def options(self, values: Mapping[str, Any] | None = None) -> BackendOptions:
        return self.options_type.from_mapping(values)

    def compile(self, captured: Captured, precision: Precision = Precision.FP32, device: str = "cpu",
                options: BackendOptions | Mapping[str, Any] | None = None, shapes: Sequence[Shape] | None = None) -> CompiledModel:
        """Build an engine. Unavailable backends and unsupported precisions raise BackendError.

        `shapes` are the shapes the engine will be run at; backends that build for fixed shape
        ranges (TensorRT profiles) use them, the others may ignore them."""
        opts = options if isinstance(options, BackendOptions) else self.options(options)
        for check in (self.availability(device), self.supports(precision, device)):
            if not check:
                raise BackendError(f"{self.name} ({precision}, {device}): {check.reason}")
        t0 = time.perf_counter()
        model = self._compile(captured, precision, device, opts, list(shapes or []))
        model.build_s = time.perf_counter() - t0
        return model

    @abstractmethod
    def _compile(self, captured: Captured, precision: Precision, device: str, options: Any, shapes: list[Shape]) -> CompiledModel:
        ...

    def load(self, directory: str | Path, device: str = "cpu") -> CompiledModel:
        directory = Path(directory)
        try:
            meta = json.loads((directory / ENGINE_META).read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{directory} holds no readable {ENGINE_META}: {e}") from e
        if meta.get("backend") != self.name:
            raise ArtifactError(f"{directory} is a {meta.get('backend')!r} engine, not {self.name!r}")
        check = self.availability(device)
        if not check:
            raise BackendError(f"{self.name} cannot load on {device}: {check.reason}")
        return self._load(directory, meta, device)

    @abstractmethod
    def _load(self, directory: Path, meta: dict[str, Any], device: str) -> CompiledModel:
        ...
