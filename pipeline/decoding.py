"""Greedy decoding over a static KV cache, with any engine for the step: the cache's geometry,
one greedy generation timed step by step, and token agreement between two generations. What
the steps are (captured programs of a causal LM) is pipeline/generate.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError

Tensors = Mapping[str, torch.Tensor]
Step = Callable[[dict[str, torch.Tensor]], Tensors]
AGREEMENT_MARGIN = 0.05  # below fp32, tokens may agree this much less than eager at that precision does


@dataclass(frozen=True)
class CacheSpec:
    """The static cache's geometry: per layer one key and one value tensor of [batch, heads, max_len, head_dim]."""

    layers: int
    heads: int
    head_dim: int
    max_len: int
    dtype: torch.dtype = torch.float32

    def names(self) -> list[str]:
        return [f"{kind}_{i}" for i in range(self.layers) for kind in ("k", "v")]

    def out_names(self) -> list[str]:
        """The updated cache among a step's outputs (ONNX wants every value named once)."""
        return [f"{n}_out" for n in self.names()]

    def empty(self, batch: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        shape = (batch, self.heads, self.max_len, self.head_dim)
        return {n: torch.zeros(shape, dtype=self.dtype, device=device) for n in self.names()}

    def nbytes(self, batch: int) -> int:
        return 2 * self.layers * batch * self.heads * self.max_len * self.head_dim * torch.finfo(self.dtype).bits // 8


@dataclass
class Generation:
    """What one greedy generation did and took."""

    tokens: torch.Tensor                # [batch, new_tokens]
    step_logits: list[torch.Tensor]     # each step's last-position logits [batch, vocab]
    prefill_ms: float
    decode_ms: list[float]              # one per decoded token after the first


def greedy(prefill: Step, decode: Step, spec: CacheSpec, prompt: torch.Tensor, new_tokens: int,
           sync: Callable[[], None] = lambda: None) -> Generation:
    """Greedy decoding of `new_tokens` tokens after `prompt` [batch, S] with the given step engines."""
    b, s = prompt.shape
    if new_tokens < 1:
        raise InputError(f"--new-tokens {new_tokens}: generate at least one token")
    if s + new_tokens > spec.max_len:
        raise InputError(f"a prompt of {s} tokens and {new_tokens} new ones need {s + new_tokens} cache positions; "
                         f"the static cache holds {spec.max_len}")
    feeds = {"input_ids": prompt, "start": torch.tensor(0, device=prompt.device), **spec.empty(b, prompt.device)}
    t0 = time.perf_counter()
    out = prefill(feeds)
    sync()
    prefill_ms = 1e3 * (time.perf_counter() - t0)
    last = out["logits"][:, -1]
    token = last.argmax(-1, keepdim=True)
    logits, tokens, times = [last.float().cpu()], [token], []  # kept on the host, outside the timed region
    for i in range(1, new_tokens):
        feeds = {"input_ids": token, "start": torch.tensor(s + i - 1, device=prompt.device),
                 **{n: out[o] for n, o in zip(spec.names(), spec.out_names())}}
        t0 = time.perf_counter()
        out = decode(feeds)
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
        last = out["logits"][:, -1]
        token = last.argmax(-1, keepdim=True)
        logits.append(last.float().cpu())
        tokens.append(token)
    return Generation(torch.cat(tokens, 1).cpu(), logits, prefill_ms, times)


@dataclass
class TokenAgreement:
    first_divergence: int | None  # the first step where any row's token differs; None: never
    agreement: float              # tokens equal over all steps and rows
    max_logits_error: list[float]  # per step, against the reference's logits at that step

    @property
    def identical(self) -> bool:
        return self.first_divergence is None


def agreement(reference: Generation, candidate: Generation) -> TokenAgreement:
    """Greedy tokens compared step by step. After a divergence the two continue from different
    tokens, so later logits errors say little; they are reported as they are."""
    same = reference.tokens == candidate.tokens
    steps = (~same).any(0).nonzero()
    errors = [float((c - r).abs().max()) for r, c in zip(reference.step_logits, candidate.step_logits)]
    return TokenAgreement(int(steps[0]) if steps.numel() else None, float(same.double().mean()), errors)


def module_step(module: nn.Module, names: list[str]) -> Step:
    """The step module called as it is: the model's own code, op by op."""

    def run(inputs: dict[str, torch.Tensor]) -> Tensors:
        with torch.no_grad():
            return dict(zip(names, module(**inputs)))

    return run
