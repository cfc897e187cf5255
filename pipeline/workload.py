"""What a job is written over: an engine (here or in a worker) and a workload (forward passes or
generation). The runner and the build take both as these protocols; the two workloads
(`forward.Forward`, `generation.Generate`) implement them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .config import RunConfig
from .inputs import Shape
from .models import ModelBundle
from .precision import Precision
from .report import Result


class Engine(Protocol):
    """What a job needs of an engine, in this process or in a worker (RemoteEngine): a forward
    engine maps named tensors to named tensors, a generation engine prompts to a Generation."""

    backend: str
    device: str
    build_s: float

    def __call__(self, inputs: Any) -> Any: ...
    def synchronize(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def notes(self) -> list[str]: ...
    def save(self, directory: str | Path) -> list[Path]: ...


Engines = dict[tuple[str, Precision], Engine]
Rows = dict[tuple[str, Precision], dict[Shape, Result]]


class Workload(Protocol):
    """What differs between forward runs and generation; everything else is the runner's and the build's."""

    mode: str  # the report's and the manifest's mode
    suffix: str  # an artifact directory's name after <backend>-<precision>

    def prepare(self) -> None: ...  # capture, references: once, before the first engine
    def compile_here(self, name: str, precision: Precision) -> Engine: ...
    def request(self, name: str, precision: Precision, cls_path: tuple[str, str]) -> tuple[str, tuple[Any, ...]]: ...
    def check(self, engine: Engine, name: str, precision: Precision) -> dict[Shape, Result]: ...
    def time(self, engines: Engines, rows: Rows) -> None: ...
    def model(self) -> dict[str, Any]: ...
    def config(self) -> dict[str, Any]: ...
    def environment(self) -> dict[str, Any]: ...
    # a build: what keys the artifact, its files loaded back and judged, the rest of its directory
    def key(self, name: str, precision: Precision) -> str: ...
    def accept(self, directory: Path, name: str, precision: Precision) -> Any: ...
    def seal(self, directory: Path, name: str, precision: Precision, key: str, verdict: Any, rows: list[Result],
             size_mb: float) -> None: ...


class Context(Protocol):
    """What a workload reads of the runner that made it."""

    bundle: ModelBundle
    cfg: RunConfig
    say: Callable[[str], None]
    cache_dir: Path | None
    engines: Engines
    env: dict[str, Any]

    def isolated(self, name: str) -> tuple[str, str] | None: ...
    def worker_pids(self) -> list[int]: ...
