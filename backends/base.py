"""The backend contract: Backend, CompiledModel, Availability, Support (options: options.py; the
records an engine carries, EngineSpec and ServingFormat: spec.py)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, final

import torch

from pipeline import manifest as fmt
from pipeline.calibration import FILE as CALIBRATION_FILE, Calibration
from pipeline.capture import Captured
from pipeline.env import device_info, version
from pipeline.errors import ArtifactError, BackendError, InputError, KilnError
from pipeline.manifest import Manifest
from pipeline.inputs import Shape, check_inputs
from pipeline.precision import Precision

from .options import BackendOptions, runtime_option
from .spec import EngineSpec, ServingFormat

__all__ = ["Availability", "Backend", "BackendOptions", "CompiledModel", "EngineSpec", "ServingFormat", "Support", "cpu_only", "ok",
           "refused", "runtime_option"]

Tensors = dict[str, torch.Tensor]
Pin = Literal["exact", "minor"]


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


@dataclass(frozen=True)
class Support:
    """How a backend takes one precision: built, never built (`refused`, with why), or built on the
    CPU only (`cpu_only`, with why); `generates`: its generation steps are built at it too."""

    refused: str | None = None
    cpu_only: str | None = None
    generates: bool = True


def ok(generates: bool = True) -> Support:
    return Support(generates=generates)


def refused(reason: str) -> Support:
    return Support(refused=reason, generates=False)


def cpu_only(reason: str, generates: bool = True) -> Support:
    return Support(cpu_only=reason, generates=generates)


class CompiledModel(ABC):
    """A compiled engine: named tensors in, named tensors out."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        # the spec's fields as attributes: what callers and subclasses read most
        self.backend, self.precision, self.device = spec.backend, spec.precision, spec.device
        self.input_names, self.output_names, self.options = spec.input_names, spec.output_names, spec.options
        self.build_s = 0.0
        self.loaded_from: Path | None = None  # the directory Backend.load read it from; None: as compiled

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> Tensors:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise InputError(f"{self.backend}: missing input(s) {', '.join(missing)}; expects {', '.join(self.input_names)}")
        check_inputs(self.spec.input_specs, self.spec.axis_ranges, inputs, self.backend)
        return self.run({n: inputs[n] for n in self.input_names})

    @abstractmethod
    def run(self, inputs: Tensors) -> Tensors:
        """Run on inputs already on this engine's device; return outputs by name."""

    def synchronize(self) -> None:
        """Wait for queued device work; timing depends on it."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def save(self, directory: str | Path) -> list[Path]:
        """Write the deployable engine into `directory` (created) with its manifest; returns the files written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = self._save_files(directory)
        if self.spec.calibration is not None:  # travels with the engine, hashed in the manifest like its other files
            files.append(self.spec.calibration.save(directory / CALIBRATION_FILE))
        engine = {**self.spec.to_dict(), **self._extra_meta()}
        return [*files, fmt.write(directory, Manifest(self.spec.backend, self.precision, device_info(self.device),
                                                      dict(self.spec.requires), engine=engine))]

    @abstractmethod
    def _save_files(self, directory: Path) -> list[Path]:
        ...

    def _extra_meta(self) -> dict[str, Any]:
        """Backend-specific facts its _load needs, kept in the manifest's `engine` section."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What the compiler actually did: kernels, fused ops, fallbacks, build time; and which engine this is."""
        return {"build_s": round(self.build_s, 3), "engine": self.engine_label()}

    def engine_label(self) -> str:
        """Which engine a row timed: the one compiled in memory, or saved files loaded back."""
        return f"saved engine loaded from {self.loaded_from.name}/" if self.loaded_from else "as compiled, in memory"

    def notes(self) -> list[str]:
        """What every reader of a report row should see about this engine (an untuned build, fixed shapes)."""
        return []


class Backend(ABC):
    name: ClassVar[str]
    # The one support table: every precision this backend knows, built or refused, and why (a
    # precision it does not name is one it has never heard of).
    support: ClassVar[Mapping[Precision, Support]]
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    # How the availability reason names a device this backend never runs on ("TensorRT runs on CUDA devices").
    runs_on: ClassVar[str] = ""
    options_type: ClassVar[type[BackendOptions]] = BackendOptions
    # The libraries a saved engine needs at load time, pinned exactly (compiled code) or to major.minor (archives).
    requires: ClassVar[Mapping[str, Pin]] = {"torch": "minor"}
    # How Triton Inference Server serves this backend's engines: its platform, and Kiln's files under Triton's names.
    serving_platform: ClassVar[str | None] = None
    serving_field: ClassVar[Literal["platform", "backend"]] = "platform"  # how Triton's config names it
    serving_files: ClassVar[Mapping[str, str]] = {}
    # Its static int8 takes the ranges of Kiln's one calibration (calibration.json travels with the
    # engine); False: its own quantizer estimates them from Kiln's calibration batches.
    calibrates: ClassVar[bool] = True

    @final
    def availability(self, device: str = "cpu") -> Availability:
        """ok, or every reason why not (a missing library and a missing device are both worth knowing); never raises."""
        reasons = []
        try:
            check = self._check(device)
            if not check:
                reasons.append(check.reason)
        except Exception as e:  # an optional library may fail to import in any way
            reasons.append(f"{type(e).__name__}: {e}")
        kind = device.split(":")[0]
        if kind not in self.devices:
            reasons.append(f"{self.runs_on or f'{self.name} runs on ' + ', '.join(self.devices)}, not {kind}")
        elif kind == "cuda" and not torch.cuda.is_available():
            reasons.append("no CUDA device")
        return Availability.no("; ".join(reasons)) if reasons else Availability.yes()

    def _check(self, device: str) -> Availability:
        """The backend's own libraries and tools on this machine."""
        return Availability.yes()

    @property
    def precisions(self) -> tuple[Precision, ...]:
        """What this backend builds (on some device), in its table's order."""
        return tuple(p for p, s in self.support.items() if s.refused is None)

    @final
    def supports(self, precision: Precision, device: str, generate: bool = False) -> Availability:
        """Whether this backend builds `precision` on `device` (its generation steps too, with `generate`)."""
        s = self.support.get(precision)
        if s is None:
            return Availability.no(f"{self.name} supports {', '.join(p.value for p in self.precisions)}")
        if s.refused is not None:
            return Availability.no(s.refused)
        if s.cpu_only is not None and device.split(":")[0] != "cpu":
            return Availability.no(s.cpu_only)
        here = self._unsupported_here(precision, device)
        if here:
            return Availability.no(here)
        if generate and not s.generates:
            built = [p.value for p, x in self.support.items() if x.generates]
            return Availability.no(f"{self.name} generation runs {', '.join(built) or 'nothing'} so far ({precision} is not built)")
        return Availability.yes()

    def _unsupported_here(self, precision: Precision, device: str) -> str | None:
        """Why this machine cannot build `precision` though the backend can (a CPU without the arithmetic)."""
        return None

    @final
    def refusal(self, precision: Precision, device: str, generate: bool = False) -> tuple[str, str] | None:
        """Why no engine is built here, as a row says it: ("unavailable", reason) or ("unsupported",
        reason); None where one is."""
        available = self.availability(device)
        if not available:
            return "unavailable", available.reason
        check = self.supports(precision, device, generate)
        return None if check else ("unsupported", check.reason)

    def options(self, values: Mapping[str, Any] | None = None) -> BackendOptions:
        return self.options_type.from_mapping(values)

    def pinned(self) -> dict[str, str]:
        """The installed versions of `requires`, at the granularity each is pinned to ("none" if absent)."""
        out = {}
        for dist, pin in self.requires.items():
            v = (version(dist) or "none").split("+")[0]
            out[dist] = v if pin == "exact" else ".".join(v.split(".")[:2])
        return out

    def spec(self, captured: Captured, precision: Precision, device: str, options: BackendOptions) -> EngineSpec:
        bundle = captured.bundle
        quant = captured.quant if precision.quantized else None
        calibration = None
        if precision == Precision.INT8 and self.calibrates:
            from .quantize import calibrate

            calibration = calibrate(captured)
        return EngineSpec(self.name, precision, device, bundle.input_names, bundle.output_names, options,
                          dict(bundle.inputs), dict(bundle.axis_ranges), self.pinned(), quant, calibration)

    @final
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
        model = self._compile(captured, self.spec(captured, precision, device, opts), list(shapes or []))
        model.build_s = time.perf_counter() - t0
        return model

    @abstractmethod
    def _compile(self, captured: Captured, spec: EngineSpec, shapes: list[Shape]) -> CompiledModel:
        ...

    @final
    def load(self, directory: str | Path, device: str | None = None) -> CompiledModel:
        """An engine from its directory. Its manifest, every file's sha256 and the library versions
        are checked before the backend opens anything (a .pt2 or .so runs code when loaded)."""
        directory = Path(directory)
        meta = fmt.read(directory)
        if meta.backend != self.name:
            raise ArtifactError(f"{directory} is a {meta.backend!r} engine, not {self.name!r}")
        fmt.check_files(directory, meta)
        fmt.check_requires(directory, meta, self.pinned())
        device = device or str(meta.device.get("type", "cpu"))
        check = self.availability(device)
        if not check:
            raise BackendError(f"{self.name} cannot load on {device}: {check.reason}")
        # a static int8 engine of a calibrating backend must carry its calibration; another's has none
        calibration = Calibration.load(directory / CALIBRATION_FILE) if meta.precision == Precision.INT8 and self.calibrates else None
        try:  # a manifest is sealed, but one written by another tool (or resealed on purpose) may still lie
            spec = EngineSpec.from_dict(self.name, meta.precision, device, meta.engine, self.options_type, self.pinned(), calibration)
        except ArtifactError as e:
            raise ArtifactError(f"{directory}: {e}") from None
        except InputError as e:
            raise ArtifactError(f"{directory}: the manifest's engine options are not {self.name}'s ({e}); rebuild it") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{directory}: the manifest's engine section lacks or garbles {e}; rebuild it") from None
        try:
            model = self._load(directory, spec, meta)
        except KilnError:
            raise
        except Exception as e:  # files that are not what a loader of this backend reads: relabelled, or another tool's
            raise ArtifactError(f"{directory}: {self.name}'s loader could not open it ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''}): is it a {self.name} engine? rebuild it") from None
        model.loaded_from = directory
        return model

    @abstractmethod
    def _load(self, directory: Path, spec: EngineSpec, manifest: Manifest) -> CompiledModel:
        ...

    def step_options(self, options: BackendOptions, step: Literal["prefill", "decode"]) -> BackendOptions:
        """The options a generation step is compiled with (pipeline.generate.compile_steps): a backend
        may build the one-token decode step and the any-length prefill step differently."""
        return options

    def serving(self, manifest: Manifest) -> ServingFormat | None:
        """How Triton serves one of this backend's engines; None where Triton has no backend for it."""
        if self.serving_platform is None:
            return None
        return ServingFormat(self.serving_platform, self.serving_files, self._max_batch(manifest), self.serving_field)

    def _max_batch(self, manifest: Manifest) -> int | None:
        """The largest batch an engine takes, where it is narrower than the model's range (a built profile)."""
        return None

