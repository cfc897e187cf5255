"""A TVM engine: one Relax VM per built library (one dynamic library, or one per tuned static shape),
and the CPU thread pool it runs on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ShapeError
from pipeline.inputs import Shape

from ..base import CompiledModel, EngineSpec, Tensors


def cpu_threads() -> int:
    """Sets up TVM's CPU thread pool before anything of TVM runs and returns its thread count.
    TVM reads these from the environment once, at its first parallel call, and MetaSchedule's
    runner workers inherit them, so the environment is the only place to set them; a value the
    user set is kept.
    - TVM_NUM_THREADS: torch's thread count. TVM's own default on x86 is half the logical CPUs (it
      assumes hyper-threading), which would time TVM on fewer cores than the engines beside it.
    - TVM_THREAD_POOL_SPIN_COUNT: 10000. With TVM's default a worker keeps spinning long after
      each call and takes a core from whatever runs next in an interleaved benchmark."""
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "10000")
    return int(os.environ["TVM_NUM_THREADS"])


def shape_of(inputs: Tensors, axes: dict[str, list[Any]]) -> Shape:
    """The (batch, seq) of a call, read from the inputs' named dynamic axes (1 where a model has no such axis)."""
    sizes = {"batch": 1, "seq": 1}
    for name, dims in axes.items():
        for size, axis in zip(inputs[name].shape, dims):
            if axis in sizes:
                sizes[axis] = int(size)
    return Shape(sizes["batch"], sizes["seq"])


def library_name(shape: Shape | None) -> str:
    return f"model-{shape}.so" if shape is not None else "model.so"


def library_shape(name: str) -> Shape | None:
    return None if name == "model.so" else Shape.parse(name.removeprefix("model-").removesuffix(".so"))


class TvmModel(CompiledModel):
    def __init__(self, spec: EngineSpec, libs: dict[Shape | None, Any], info: dict[str, Any]) -> None:
        super().__init__(spec)
        import tvm
        from tvm import relax

        self.dev = tvm.cuda(torch.device(self.device).index or 0) if self.device.startswith("cuda") else tvm.cpu()
        self.libs, self.info = libs, info
        if not self.device.startswith("cuda"):
            self.info["threads"] = cpu_threads()  # before the VM first runs: TVM reads it once
        self.vms = {s: relax.VirtualMachine(lib, self.dev) for s, lib in libs.items()}

    def run(self, inputs: Tensors) -> Tensors:
        import tvm

        key: Shape | None = None if None in self.vms else shape_of(inputs, self.info["axes"])
        if key not in self.vms:
            built = ", ".join(str(s) for s in self.vms)
            raise ShapeError(f"this TVM engine was tuned for the static shapes {built}; got {key}")
        args = [tvm.runtime.tensor(t.detach().cpu().numpy(), self.dev) for t in inputs.values()]
        out = self.vms[key]["main"](*args)
        outs = out if isinstance(out, (list, tuple)) or type(out).__name__ == "Array" else [out]
        return {n: torch.from_numpy(np.asarray(o.numpy())).to(self.device) for n, o in zip(self.output_names, outs)}

    def synchronize(self) -> None:
        self.dev.sync()

    def _save_files(self, directory: Path) -> list[Path]:
        files = []
        for s, lib in self.libs.items():
            path = directory / library_name(s)
            lib.export_library(str(path))
            files.append(path)
        return files

    def _extra_meta(self) -> dict[str, Any]:
        # a process that loads the .so without Kiln should set TVM_NUM_THREADS to `threads` (see cpu_threads)
        return {"axes": self.info["axes"], **({"threads": self.info["threads"]} if "threads" in self.info else {})}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.info}

    def notes(self) -> list[str]:
        return [str(self.info[k]) for k in ("warning", "note") if self.info.get(k)]
