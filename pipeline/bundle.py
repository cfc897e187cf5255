"""What a model is to Kiln: a ModelBundle, an eval-mode fp32 module that takes named tensors and
returns a tuple of tensors, with the names, dtypes and dynamic axes of its inputs (InputSpec).
Where models come from (the zoo, Hugging Face directories): pipeline/models.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .heads import HEADS

Task = str  # a head's name (pipeline/heads.py), or "generic": a module given as it is
Axis = int | str  # a fixed size, or the name of a dynamic axis ("batch", "seq")


@dataclass(frozen=True)
class InputSpec:
    dtype: torch.dtype
    dims: tuple[Axis, ...]
    high: int = 2  # exclusive upper bound of generated integer values (vocab size for ids)
    bounded: bool = False  # whether `high` bounds every valid value (a vocabulary), or only the generated ones

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": str(self.dtype).removeprefix("torch."), "dims": list(self.dims), "high": self.high, "bounded": self.bounded}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        dtype = getattr(torch, str(d["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise InputError(f"unknown input dtype {d['dtype']!r}")
        return cls(dtype, tuple(d["dims"]), int(d.get("high", 2)), bool(d.get("bounded", False)))


@dataclass
class ModelBundle:
    name: str
    module: nn.Module
    inputs: dict[str, InputSpec]
    output_names: tuple[str, ...]
    task: Task
    source: str
    axis_ranges: dict[str, tuple[int, int]] = field(default_factory=lambda: {"batch": (1, 64)})
    tokenizer: Any = None
    pad_token_id: int = 0
    example: dict[str, torch.Tensor] | None = None  # given by the caller for generic modules
    summary: dict[str, Any] = field(default_factory=dict)
    spec: str | None = None  # what load_model was given, so another process can load the same model; None: in memory
    load_task: str | None = None  # the --task load_model was given with it
    processor: Any = None  # an image model's image processor (its mean, std and size), when its directory has one
    notes: list[str] = field(default_factory=list)  # how loading or capture departed from the usual: said in every row

    @property
    def vision(self) -> bool:
        return self.task in HEADS and HEADS[self.task].vision

    @property
    def options(self) -> int:
        """How many sequences a row of text holds: a multiple-choice head's options, else 1."""
        return (HEADS[self.task].options or 1) if self.task in HEADS else 1

    @property
    def padding_side(self) -> str:
        """Where this model's own tokenizer puts padding (some decoders' pad left); right without one."""
        return str(getattr(self.tokenizer, "padding_side", "right") or "right")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "task": self.task,
            "parameters": self.num_parameters,
            "inputs": {n: {"dtype": str(s.dtype).removeprefix("torch."), "dims": list(s.dims)} for n, s in self.inputs.items()},
            "outputs": list(self.output_names),
            "axis_ranges": {k: list(v) for k, v in self.axis_ranges.items()},
            "tokenizer": self.tokenizer is not None,
            **({"notes": list(self.notes)} if self.notes else {}),
            **self.summary,
        }

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        example_inputs: Mapping[str, torch.Tensor],
        *,
        name: str = "module",
        dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
        axis_ranges: Mapping[str, tuple[int, int]] | None = None,
    ) -> ModelBundle:
        """Wrap any nn.Module taking named tensors. dynamic_axes: {input: {dim: "batch"|"seq"|name}}."""
        dynamic_axes = dynamic_axes or {}
        specs: dict[str, InputSpec] = {}
        for iname, t in example_inputs.items():
            axes = dynamic_axes.get(iname, {})
            dims = tuple(axes.get(i, size) for i, size in enumerate(t.shape))
            high = int(t.max().item()) + 1 if not t.is_floating_point() and t.numel() else 2
            specs[iname] = InputSpec(t.dtype, dims, max(high, 2))
        wrapped = _tuple_outputs(module, list(example_inputs)).eval()
        with torch.no_grad():
            outs = module(**example_inputs)
        names = _output_names(outs)
        ranges = {"batch": (1, 64), "seq": (1, 512)}
        ranges.update(axis_ranges or {})
        used = {a for s in specs.values() for a in s.dims if isinstance(a, str)}
        return cls(name=name, module=wrapped, inputs=specs, output_names=names, task="generic",
                   source="nn.Module", axis_ranges={a: ranges.get(a, (1, 64)) for a in used},
                   example=dict(example_inputs))


class _TupleOutputs(nn.Module):
    """Calls a module with named tensors and flattens its output to a tuple of tensors.

    torch.export needs the input names in forward's signature (not **kwargs), so each
    wrapper gets a subclass whose forward names them: see `_tuple_outputs`.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def _call(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.inner(**inputs)
        if isinstance(out, torch.Tensor):
            return (out,)
        if isinstance(out, Mapping):
            return tuple(v for v in out.values() if isinstance(v, torch.Tensor))
        return tuple(out)


def _tuple_outputs(inner: nn.Module, names: Sequence[str]) -> nn.Module:
    bad = [n for n in names if not n.isidentifier() or n == "self"]
    if bad:
        raise InputError(f"input names must be Python identifiers: {', '.join(map(repr, bad))}")
    params = ", ".join(names)
    ns: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self._call({{{', '.join(f'{n!r}: {n}' for n in names)}}})\n", ns)
    cls = type("TupleOutputs", (_TupleOutputs,), {"forward": ns["forward"]})
    return cls(inner)


def _output_names(out: Any) -> tuple[str, ...]:
    if isinstance(out, torch.Tensor):
        return ("output",)
    if isinstance(out, Mapping):
        return tuple(k for k, v in out.items() if isinstance(v, torch.Tensor))
    return tuple(f"output_{i}" for i in range(len(out)))
