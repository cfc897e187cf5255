"""`kiln run --mode generate`: generation with a static KV cache, as programs every backend can compile.

One causal LM becomes one step function, captured with torch.export:

    step(input_ids [B, T], start [], k_0, v_0, ..., k_{L-1}, v_{L-1}) -> (logits [B, T, V], k_0', v_0', ...)

where every cache tensor is [B, heads, max_len, head_dim] and `start` is how many positions the
cache already holds. The cache goes in and comes out as plain tensors (no buffer mutated in
place), so every backend, through ONNX or from the program itself, compiles the same function. Prefill is the step at
T = prompt length from start 0; decoding is the step at T = 1, captured on its own so compilers
specialize it. Greedy decoding, its timing and token-by-token equivalence live here too, and take
any callable for the step: whichever engine compiled it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from .decoding import CacheSpec, Step
from .errors import InputError
from .heads import HEADS
from .inputs import Shape
from .capture import Captured, capture
from .models import InputSpec, ModelBundle
from .precision import Precision

Tensors = Mapping[str, torch.Tensor]
MODE, STEPS = "generate", ("prefill", "decode")  # a generation artifact's manifest mode, and its two step engines


def _layer_class() -> type:
    from transformers.cache_utils import StaticLayer

    class FunctionalLayer(StaticLayer):  # type: ignore[misc, valid-type]
        """A static cache layer over given tensors, updated out of place: the new tensors are the
        step's outputs, so the captured program mutates nothing."""

        keys: torch.Tensor
        values: torch.Tensor

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor) -> None:
            super().__init__(max_cache_len=keys.shape[2])
            self.keys, self.values, self.cumulative_length = keys, values, start
            self.dtype, self.device = keys.dtype, keys.device
            self.batch_size, self.num_heads = keys.shape[:2]
            self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            # Written as arithmetic with a one-hot [max_len, T] matrix rather than index_copy:
            # index_copy reaches TVM's importer as an index_put it cannot type, while a product
            # and a sum every compiler takes. Exact: each slot gets x * 1 plus zeros, or keeps its value.
            t = key_states.shape[-2]
            slots = torch.arange(self.max_cache_len, device=key_states.device).unsqueeze(1)
            onehot = (slots == torch.arange(t, device=key_states.device).unsqueeze(0) + self.cumulative_length).to(self.keys.dtype)
            keep = (1 - onehot.sum(1)).view(1, 1, -1, 1)
            self.keys = self.keys * keep + torch.einsum("lt,bhtd->bhld", onehot, key_states.to(self.keys.dtype))
            self.values = self.values * keep + torch.einsum("lt,bhtd->bhld", onehot, value_states.to(self.values.dtype))
            return self.keys, self.values

    return FunctionalLayer


def cache_spec(bundle: ModelBundle, max_len: int) -> CacheSpec:
    if not (bundle.task in HEADS and HEADS[bundle.task].generates):
        raise InputError(f"generation needs a causal LM; {bundle.name} is {bundle.task}")
    config: Any = bundle.module.model.config  # type: ignore[union-attr]
    text = config.get_text_config(decoder=True)
    heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    limit = bundle.axis_ranges.get("seq", (1, max_len))[1]
    if not 2 <= max_len <= limit:
        raise InputError(f"a static cache of {max_len} positions: {bundle.name} takes 2 to {limit}")
    return CacheSpec(int(text.num_hidden_layers), heads, head_dim, max_len)


class StepModule(nn.Module):
    """A causal LM as (input_ids, start, *cache) -> (logits, *cache'): see the module's docstring."""

    def __init__(self, model: nn.Module, spec: CacheSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        self._layer = _layer_class()

    def forward(self, input_ids: torch.Tensor, start: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import Cache

        layers = [self._layer(cache[2 * i], cache[2 * i + 1], start) for i in range(self.spec.layers)]
        past = Cache(layers=layers)
        t = input_ids.shape[1]
        positions = (torch.arange(t, device=input_ids.device) + start).unsqueeze(0).expand(input_ids.shape[0], t)
        out = self.model(input_ids=input_ids, position_ids=positions, cache_position=positions[0], past_key_values=past,
                         use_cache=True)
        return (out.logits, *[x for layer in layers for x in (layer.keys, layer.values)])


def _named(module: StepModule) -> nn.Module:
    """StepModule with every input named in forward's signature, as torch.export and the engines want."""
    names = ["input_ids", "start", *module.spec.names()]
    ns: dict[str, Any] = {}
    exec(f"def forward(self, {', '.join(names)}):\n    return StepModule.forward(self, {', '.join(names)})\n",
         {"StepModule": StepModule}, ns)
    cls: Any = type("NamedStep", (StepModule,), {"forward": ns["forward"]})
    named = cls.__new__(cls)
    named.__dict__ = module.__dict__
    return named


@dataclass
class GenerationPrograms:
    spec: CacheSpec
    module: nn.Module         # the step as the model's own code with transformers' cache layers: the reference
    # the prefill (input_ids [batch, T], T dynamic) and decode (input_ids [batch, 1]) steps, each
    # captured like a forward model, so every backend compiles, saves and loads them as it does a
    # forward engine (int8-dynamic ones quantized before they were captured)
    steps: tuple[Captured, Captured]
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def captured(self) -> tuple[ExportedProgram, ExportedProgram]:
        """The prefill and decode programs."""
        return self.steps[0].program, self.steps[1].program

    @property
    def prefill(self) -> ExportedProgram:
        return self.captured()[0]

    @property
    def decode(self) -> ExportedProgram:
        return self.captured()[1]


def _linear_from_conv1d(model: nn.Module) -> nn.Module:
    """GPT-2's Conv1D layers (a linear layer with its weight transposed) as nn.Linear, so that
    quantizers that take linear layers (torchao's) take them too. The same function: y = xW + b."""
    from transformers.pytorch_utils import Conv1D

    for name, child in list(model.named_children()):
        if isinstance(child, Conv1D):
            linear = nn.Linear(child.nx, child.nf, dtype=child.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(child.weight.T)
                linear.bias.copy_(child.bias)
            setattr(model, name, linear)
        else:
            _linear_from_conv1d(child)
    return model


def quantized_generation(bundle: ModelBundle, max_len: int, cache_dir: Path | str | None = None) -> GenerationPrograms:
    """int8-dynamic steps: every linear layer (GPT-2's Conv1D included) with int8 weights per
    output channel and activations quantized per token at run time (torchao's
    Int8DynamicActivationInt8WeightConfig). The quantized module is the int8 reference; each step
    is then captured with torch.export as any step is (torchao's int8 weights kept as they are),
    so a backend takes the quantized step as it is (`Captured.prequantized`)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    spec = cache_spec(bundle, max_len)
    wrapper: Any = copy.deepcopy(bundle.module)
    hf = _linear_from_conv1d(_explicit_attention(wrapper.model).eval())
    quantize_(hf, Int8DynamicActivationInt8WeightConfig())
    step = _named(StepModule(hf, spec)).eval()
    ranges = bundle.axis_ranges.get("batch", (1, 64))
    steps = [dataclasses.replace(capture(step_bundle(bundle, spec, step, prefill, ranges), cache_dir), prequantized=Precision.INT8_DYNAMIC)
             for prefill in (True, False)]
    return GenerationPrograms(spec, step, (steps[0], steps[1]), ["input_ids", "start", *spec.names()], ["logits", *spec.out_names()])


def _explicit_attention(model: nn.Module) -> nn.Module:
    """The steps use the model's explicit attention (softmax over a causal mask), not sdpa: with a
    symbolic prompt length, GPT-2's sdpa program fails torch's own decomposition to core ATen (a
    view of the transposed attention output), which importers that decompose (TVM's) run first.
    sdpa is what forward runs ask for because a fully padded row is NaN in the explicit softmax;
    a causal step over unpadded prompts never masks a whole row."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None and getattr(getattr(model, "config", None), "_attn_implementation", "eager") != "eager":
        setter("eager")
    return model


def step_bundle(bundle: ModelBundle, spec: CacheSpec, step: nn.Module, prefill: bool,
                batch_range: tuple[int, int] = (1, 64)) -> ModelBundle:
    """One generation step as a model of its own: inputs `input_ids` ([batch, seq] for prefill,
    [batch, 1] for decode; ids within the vocabulary), `start` (a 0-dim position within the
    cache) and the cache tensors ([batch, heads, max_len, head_dim] in the cache's dtype)."""
    vocab = int(bundle.inputs["input_ids"].high)
    head = (spec.heads, spec.max_len, spec.head_dim)
    inputs = {"input_ids": InputSpec(torch.int64, ("batch", "seq") if prefill else ("batch", 1), vocab, bounded=True),
              "start": InputSpec(torch.int64, (), spec.max_len, bounded=True),
              **{n: InputSpec(spec.dtype, ("batch", *head)) for n in spec.names()}}
    g = torch.Generator().manual_seed(0)
    # batch 2 and a 4-token prompt keep both axes dynamic (a size-1 example would be specialized)
    t = 4 if prefill else 1
    example = {"input_ids": torch.randint(0, vocab, (2, t), generator=g), "start": torch.tensor(0 if prefill else 3),
               **spec.empty(2)}
    ranges = {"batch": batch_range, **({"seq": (1, spec.max_len)} if prefill else {})}
    return ModelBundle(name=f"{bundle.name}-{'prefill' if prefill else 'decode'}", module=step, inputs=inputs,
                       output_names=("logits", *spec.out_names()), task="generic", source=bundle.source,
                       axis_ranges=ranges, example=example)


def capture_generation(bundle: ModelBundle, max_len: int, batch_range: tuple[int, int] = (1, 64),
                       dtype: torch.dtype = torch.float32, cache_dir: Path | str | None = None) -> GenerationPrograms:
    """The prefill and decode steps of `bundle`'s causal LM (weights and cache in `dtype`), each
    captured with torch.export as a model of its own (`step_bundle`)."""
    spec = dataclasses.replace(cache_spec(bundle, max_len), dtype=dtype)
    wrapper: Any = bundle.module
    hf: Any = _explicit_attention(copy.deepcopy(wrapper.model))
    step = _named(StepModule(hf.to(dtype).eval(), spec)).eval()
    steps = []
    for prefill in (True, False):
        captured = capture(step_bundle(bundle, spec, step, prefill, batch_range), cache_dir)
        lower = {torch.float16: Precision.FP16, torch.bfloat16: Precision.BF16}.get(dtype)
        if lower is not None:  # captured in its own dtype already: backends asking for that precision's program get it
            captured._programs[lower] = captured.program
        steps.append(captured)
    return GenerationPrograms(spec, step, (steps[0], steps[1]), ["input_ids", "start", *spec.names()],
                              ["logits", *spec.out_names()])


def decode_shapes(shapes: Sequence[Shape]) -> list[Shape]:
    """The decode step's calls for prompts at `shapes`: one token at each batch."""
    return [Shape(b, 1) for b in sorted({s.batch for s in shapes})]


def compile_steps(backend: Any, programs: GenerationPrograms, precision: Precision, device: str, options: Any,
                  shapes: Sequence[Shape] = ()) -> GenerationEngine:
    """A backend's prefill and decode engines (`kiln run --mode generate`), for calls at `shapes`
    (BATCHxPROMPT). Each step is compiled as a forward model is (so it saves and loads as one);
    the decode step's shapes are one token at each batch asked. The caller has read the backend's
    support table (`Backend.refusal(..., generate=True)`)."""
    prefill = backend.compile(programs.steps[0], precision, device, backend.step_options(options, "prefill"), list(shapes))
    decode = backend.compile(programs.steps[1], precision, device, backend.step_options(options, "decode"), decode_shapes(shapes))
    return GenerationEngine.of(prefill, decode)


@dataclass
class GenerationEngine:
    """A backend's compiled prefill and decode steps, and what every row of them should say.
    `models`: the two steps as engines that save and load (None where they are not)."""

    prefill: Step
    decode: Step
    notes: list[str] = field(default_factory=list)
    models: tuple[Any, Any] | None = None  # (CompiledModel, CompiledModel)

    @classmethod
    def of(cls, prefill: Any, decode: Any) -> GenerationEngine:
        """From two compiled step engines (CompiledModel): their notes, said once."""
        notes = [f"{kind}: {n}" for kind, m in (("prefill", prefill), ("decode", decode)) for n in m.notes()]
        return cls(engine_step(prefill), engine_step(decode), notes, (prefill, decode))


def engine_step(model: Any) -> Step:
    """A compiled step engine as a Step (its inputs in the order it takes them, no door check: the
    step's feeds are made by `greedy`, which checks the prompt and the cache length)."""
    names = tuple(model.input_names)
    return lambda feeds: model.run({n: feeds[n] for n in names})
