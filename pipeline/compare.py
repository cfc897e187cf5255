"""Equivalence, measured: per-output errors against eager fp32 and an fp64 shadow, cosine, task agreement.

A verdict says why it passed or failed and which tolerance would have passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .heads import HEADS
from .precision import INT8_FLOOR, Precision, Tolerance

Tensors = Mapping[str, torch.Tensor]


@dataclass
class OutputMetrics:
    name: str
    dtype: str = ""                 # the candidate's output dtype
    max_abs: float = 0.0            # vs eager fp32
    max_rel: float = 0.0            # |c-r| / max(|r|, 1e-6 * max|r|), vs eager fp32
    rmse_vs_fp64: float = 0.0       # candidate vs the fp64 shadow
    eager_rmse_vs_fp64: float = 0.0  # eager at the same precision vs the shadow: what the precision itself costs
    eager_max_abs_vs_fp64: float = 0.0
    cosine: float = 1.0             # whole output, min over batches
    eager_cosine: float = 1.0       # eager at the same precision vs eager fp32
    needed_atol: float = 0.0        # the atol (with rtol unchanged) that would have passed
    atol: float = 0.0               # effective atol applied
    rtol: float = 0.0
    min_cosine: float = 0.0
    nonfinite: int = 0              # NaN or Inf in the engine's output
    nonfinite_reference: int = 0    # ... in eager fp32 or the fp64 shadow
    nonfinite_eager: int = 0        # ... in eager at the engine's precision (an fp16 overflow)
    elements: int = 0
    violations: int = 0
    agreement: float | None = None  # top-1 (logits) or nearest-neighbour ranking (embeddings)
    agreement_kind: str | None = None
    eager_agreement: float | None = None
    min_agreement: float | None = None
    embedding_cosine: float | None = None  # encoders: mean-pooled sentence embeddings, min over rows
    eager_embedding_cosine: float | None = None
    judged_by: str = "elementwise"  # or "task": int8, where elementwise error is reported but not the verdict
    top5_overlap: float | None = None
    passed: bool = True
    reason: str = ""

    @property
    def error_ratio(self) -> float | None:
        """How much worse than eager at the same precision (1.0 = as good as eager)."""
        return self.rmse_vs_fp64 / self.eager_rmse_vs_fp64 if self.eager_rmse_vs_fp64 > 0 else None

    @property
    def applied(self) -> Tolerance:
        """The tolerance this verdict applied, already widened: judges the same output again without a shadow."""
        return Tolerance(self.atol, self.rtol, self.min_cosine,
                         self.min_agreement if self.min_agreement is not None else 0.0, shadow_factor=0.0)


@dataclass
class Comparison:
    passed: bool
    reason: str
    outputs: list[OutputMetrics] = field(default_factory=list)
    batches: int = 0

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "batches": self.batches,
                "outputs": [{**asdict(o), "error_ratio": o.error_ratio} for o in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Comparison:
        names = {f.name for f in fields(OutputMetrics)}
        outputs = [OutputMetrics(**{k: v for k, v in o.items() if k in names}) for o in d.get("outputs", [])]
        return cls(bool(d["passed"]), str(d.get("reason", "")), outputs, int(d.get("batches", 0)))

    @property
    def worst(self) -> OutputMetrics | None:
        return max(self.outputs, key=lambda o: o.max_abs, default=None)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0, eps=1e-30))


def unpadded(mask: torch.Tensor | None, t: torch.Tensor, task: str) -> torch.Tensor:
    """Which elements of an output are at real tokens: those of a [batch, seq, ...] output whose
    position the mask keeps (a [batch, seq] output only for a per-position head's, span logits: a classifier's
    [batch, labels] could match the mask's shape by chance); every element of any other output."""
    head = HEADS.get(task)
    per_position = t.dim() >= 3 or (t.dim() == 2 and head is not None and head.per_position)
    if mask is None or not per_position or tuple(t.shape[:2]) != tuple(mask.shape):
        return torch.ones(t.shape, dtype=torch.bool)
    return mask.bool().cpu().reshape(*mask.shape, *([1] * (t.dim() - 2))).expand(t.shape)


class Comparator:
    """Accumulates metrics over several batches; `result()` gives the verdict."""

    def __init__(self, precision: Precision, task: str = "generic",
                 tolerances: Tolerance | Mapping[str, Tolerance] | None = None) -> None:
        self.precision, self.task = precision, task
        self.tolerances = tolerances
        self._acc: dict[str, dict[str, Any]] = {}
        self.batches = 0

    def tolerance(self, output: str) -> Tolerance:
        if isinstance(self.tolerances, Tolerance):
            return self.tolerances
        if self.tolerances and output in self.tolerances:
            return self.tolerances[output]
        return self.precision.tolerance

    def add(self, candidate: Tensors, reference: Tensors, shadow: Tensors,
            eager_at_precision: Tensors | None = None, mask: torch.Tensor | None = None, task: bool = True) -> None:
        """candidate and eager_at_precision at the engine's precision; reference eager fp32; shadow eager fp64.
        `task`: this batch counts for task agreement (real sentences do; random ids are no task)."""
        self.batches += 1
        for name, ref_t in reference.items():
            if name not in candidate:
                raise KeyError(f"candidate has no output {name!r} (has {', '.join(candidate)})")
            a = self._acc.setdefault(name, {"m": OutputMetrics(name), "sq": 0.0, "sq_eager": 0.0, "agree": [], "eager_agree": [],
                                            "top5": [], "emb_cos": [], "eager_emb_cos": []})
            m: OutputMetrics = a["m"]
            c, r, s = _f64(candidate[name]), _f64(ref_t), _f64(shadow[name])
            e = _f64(eager_at_precision[name]) if eager_at_precision is not None else r
            if c.shape != r.shape:
                raise ValueError(f"output {name!r}: shape {tuple(c.shape)} differs from eager's {tuple(r.shape)}")
            tol = self.tolerance(name)
            m.dtype = str(candidate[name].dtype).removeprefix("torch.")
            # Every metric is taken over the elements finite in all four tensors; the others are
            # counted and fail the verdict, so no NaN can hide in a max and no Inf can widen atol.
            # Positions that are padding are never compared: what a model computes there is
            # discarded by every user, and a causal LM's left padding can hold anything.
            keep = unpadded(mask, c, self.task)
            fc, fr, fe = (torch.isfinite(x) | ~keep for x in (c, r, e))
            fr &= torch.isfinite(s) | ~keep
            m.nonfinite += int((~fc).sum())
            m.nonfinite_reference += int((~fr).sum())
            m.nonfinite_eager += int((~fe).sum())
            m.elements += int(keep.sum())
            ok = fc & fr & fe & keep
            c, r, s, e = (torch.where(ok, x, torch.zeros_like(x)) for x in (c, r, s, e))
            diff = (c - r).abs()
            m.max_abs = max(m.max_abs, float(diff.max()) if diff.numel() else 0.0)
            floor = 1e-6 * float(r.abs().max()) if r.numel() else 0.0
            m.max_rel = max(m.max_rel, float((diff / r.abs().clamp(min=max(floor, 1e-12))).max()))
            a["sq"] += float(((c - s) ** 2).sum())
            a["sq_eager"] += float(((e - s) ** 2).sum())
            m.eager_max_abs_vs_fp64 = max(m.eager_max_abs_vs_fp64, float((e - s).abs().max()))
            m.cosine = min(m.cosine, _cosine(c, r))
            m.eager_cosine = min(m.eager_cosine, _cosine(e, r))
            excess = diff - tol.rtol * r.abs()
            m.needed_atol = max(m.needed_atol, float(excess.max().clamp(min=0)) if excess.numel() else 0.0)
            a.setdefault("beyond_floor", []).append(excess[excess > tol.atol].float())  # few, unless failing
            if task:
                self._agreement(a, c, r, e, mask)

    def _agreement(self, a: dict[str, Any], c: torch.Tensor, r: torch.Tensor, e: torch.Tensor, mask: torch.Tensor | None) -> None:
        valid = mask.bool().cpu() if mask is not None else torch.ones(c.shape[:2], dtype=torch.bool)
        head = HEADS.get(self.task)
        if head is not None and head.agreement is not None:  # the head's own measure (pipeline/heads.py)
            head.agreement(a, c, r, e, valid, mask)

    def result(self) -> Comparison:
        outputs = []
        for name, a in self._acc.items():
            m: OutputMetrics = a["m"]
            tol = self.tolerance(name)
            n = max(m.elements, 1)
            m.rmse_vs_fp64, m.eager_rmse_vs_fp64 = math.sqrt(a["sq"] / n), math.sqrt(a["sq_eager"] / n)
            # Both bounds widen to shadow_factor times what eager itself loses at this precision, never narrow.
            m.atol, m.rtol = max(tol.atol, tol.shadow_factor * m.eager_max_abs_vs_fp64), tol.rtol
            m.min_cosine = min(tol.min_cosine, 1 - tol.shadow_factor * (1 - m.eager_cosine))
            m.violations = sum(int((x > m.atol).sum()) for x in a.pop("beyond_floor", []))
            if a["agree"]:
                m.agreement_kind = a["kind"]
                m.agreement = float(torch.cat(a["agree"]).mean())
                m.eager_agreement = float(torch.cat(a["eager_agree"]).mean())
                m.min_agreement = min(tol.min_agreement, m.eager_agreement - 0.02)
            if a["top5"]:
                m.top5_overlap = float(torch.cat(a["top5"]).mean())
            if a["emb_cos"]:
                m.embedding_cosine = float(torch.cat(a["emb_cos"]).min())
                m.eager_embedding_cosine = float(torch.cat(a["eager_emb_cos"]).min())
            if self.precision.quantized:
                self._task_thresholds(m, tol)
            m.passed, m.reason = _verdict(m)
            outputs.append(m)
        passed = all(o.passed for o in outputs) and bool(outputs)
        failing = [o for o in outputs if not o.passed]
        if not outputs:
            reason = "nothing compared"
        elif failing:
            reason = "; ".join(f"{o.name}: {o.reason}" for o in failing)
        else:
            reason = "; ".join(f"{o.name}: {o.reason}" for o in outputs)
        return Comparison(passed, reason, outputs, self.batches)


    @staticmethod
    def _task_thresholds(m: OutputMetrics, tol: Tolerance) -> None:
        """int8: the cosine that counts is the sentence embeddings' where there are some (else the
        whole output's), and both it and the agreement threshold loosen to what the int8 reference
        reaches, less a margin, never below INT8_FLOOR."""
        m.judged_by = "task"
        if tol.shadow_factor == 0:  # a tolerance recorded at build: applied as it is
            m.min_cosine, m.min_agreement = tol.min_cosine, tol.min_agreement if m.agreement is not None else None
            return
        ref_cos = m.eager_embedding_cosine if m.embedding_cosine is not None else m.eager_cosine
        m.min_cosine = max(INT8_FLOOR.min_cosine, min(tol.min_cosine, 1 - tol.shadow_factor * (1 - (ref_cos or 0.0))))
        if m.eager_agreement is not None:
            m.min_agreement = max(INT8_FLOOR.min_agreement, min(tol.min_agreement, m.eager_agreement - 0.02))


def _verdict(m: OutputMetrics) -> tuple[bool, str]:
    bad = [f"{n} of {m.elements} values are NaN or Inf{where}" for n, where in
           ((m.nonfinite, ""), (m.nonfinite_reference, " in eager fp32 or the fp64 shadow"),
            (m.nonfinite_eager, " in eager at this precision (it overflows)")) if n]
    if bad:
        return False, "; ".join(bad)
    problems = []
    if m.judged_by == "task":
        return _task_verdict(m)
    if m.violations:
        problems.append(f"{m.violations} of {m.elements} elements beyond atol {m.atol:.1e} + rtol {m.rtol:.0e}*|ref| "
                        f"(max abs {m.max_abs:.2e}); would pass with atol {m.needed_atol * 1.01:.2e}")
    if m.cosine < m.min_cosine:
        problems.append(f"cosine {m.cosine:.6f} < {m.min_cosine}")
    if m.embedding_cosine is not None and m.embedding_cosine < m.min_cosine:
        problems.append(f"sentence-embedding cosine {m.embedding_cosine:.6f} < {m.min_cosine}")
    if m.agreement is not None and m.min_agreement is not None and m.agreement < m.min_agreement:
        problems.append(f"{m.agreement_kind} agreement {m.agreement:.1%} < {m.min_agreement:.1%} (eager at this precision: {m.eager_agreement:.1%})")
    if problems:
        return False, "; ".join(problems)
    ratio = f", {m.rmse_vs_fp64 / m.eager_rmse_vs_fp64:.2f}x eager's own error" if m.eager_rmse_vs_fp64 > 0 else ""
    agree = f", {m.agreement_kind} {m.agreement:.0%}" if m.agreement is not None else ""
    return True, f"max abs {m.max_abs:.1e} within atol {m.atol:.0e}{ratio}, cosine {m.cosine:.6f}{agree}"


def _task_verdict(m: OutputMetrics) -> tuple[bool, str]:
    """Encoders: sentence-embedding cosine and neighbours. Heads with a prediction (a label, a
    span, a token): their agreement alone; the logits' cosine is reported (a classifier's few
    logits near zero can point elsewhere while every label holds). Anything else: its cosine."""
    cos, what = (m.embedding_cosine, "sentence-embedding cosine") if m.embedding_cosine is not None else (m.cosine, "cosine")
    ref = m.eager_embedding_cosine if m.embedding_cosine is not None else m.eager_cosine
    judge_cosine = m.embedding_cosine is not None or m.agreement is None
    problems = []
    if judge_cosine and cos < m.min_cosine:
        problems.append(f"{what} {cos:.4f} < {m.min_cosine:.4f} (the int8 reference: {ref:.4f})")
    if m.agreement is not None and m.min_agreement is not None and m.agreement < m.min_agreement:
        problems.append(f"{m.agreement_kind} agreement {m.agreement:.1%} < {m.min_agreement:.1%} (the int8 reference: {m.eager_agreement:.1%})")
    if problems:
        return False, "; ".join(problems) + f"; max abs {m.max_abs:.2e} (reported, not judged)"
    if not judge_cosine:
        return True, (f"{m.agreement_kind} agreement {m.agreement:.0%} >= {m.min_agreement:.0%} "
                      f"({what} {cos:.4f}, max abs {m.max_abs:.1e}: reported, not judged)")
    agree = f", {m.agreement_kind} {m.agreement:.0%}" if m.agreement is not None else ""
    return True, f"{what} {cos:.4f} >= {m.min_cosine:.4f}{agree} (max abs {m.max_abs:.1e}, reported, not judged)"


def compare(candidate: Tensors, reference: Tensors, shadow: Tensors | None = None, *,
            precision: Precision = Precision.FP32, task: str = "generic", eager_at_precision: Tensors | None = None,
            mask: torch.Tensor | None = None, tolerances: Tolerance | Mapping[str, Tolerance] | None = None) -> Comparison:
    """One batch, one verdict. Without a shadow, the reference stands in for it."""
    comp = Comparator(precision, task, tolerances)
    comp.add(candidate, reference, shadow if shadow is not None else reference, eager_at_precision, mask)
    return comp.result()
