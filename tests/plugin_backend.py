"""A backend that lives outside Kiln's package, as a third party's would: registered through the
`kiln.backends` entry-point group (conftest.py puts a distribution declaring it on sys.path) and
put through the same conformance suite as the built-in ones. It runs the captured program itself
(torch.export's module, no compiler) and saves the program as its engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends.base import Backend, BackendOptions, CompiledModel, EngineSpec, Tensors, ok, refused
from pipeline.capture import Captured
from pipeline.inputs import Shape
from pipeline.manifest import Manifest
from pipeline.precision import Precision


@dataclass(frozen=True)
class ExportedProgramOptions(BackendOptions):
    pass


class ExportedProgramModel(CompiledModel):
    def __init__(self, spec: EngineSpec, program: torch.export.ExportedProgram) -> None:
        super().__init__(spec)
        self.program, self.module = program, program.module().to(spec.device)

    def run(self, inputs: Tensors) -> Tensors:
        with torch.no_grad():
            return dict(zip(self.output_names, self.module(**inputs)))

    def _save_files(self, directory: Path) -> list[Path]:
        torch.export.save(self.program, str(directory / "program.pt2"))
        return [directory / "program.pt2"]


class ExportedProgramBackend(Backend):
    name = "exported-program"
    support = {Precision.FP32: ok(), Precision.FP16: ok(),
               Precision.BF16: refused("exported-program is a test plugin; it refuses bf16 to show how a refusal reads")}
    options_type = ExportedProgramOptions

    def _compile(self, captured: Captured, spec: EngineSpec, shapes: list[Shape]) -> CompiledModel:
        return ExportedProgramModel(spec, captured.program_at(spec.precision))

    def _load(self, directory: Path, spec: EngineSpec, manifest: Manifest) -> CompiledModel:
        return ExportedProgramModel(spec, torch.export.load(str(directory / "program.pt2")))
