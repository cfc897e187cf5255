"""The comparator's metrics on known inputs with known results."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.compare import Comparator, compare
from pipeline.heads import pooled_embeddings
from pipeline.precision import Precision, Tolerance


def _ref(seed: int = 0, shape: tuple[int, ...] = (4, 8, 16)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_outputs_pass_with_zero_error() -> None:
    r = _ref()
    c = compare({"y": r.float()}, {"y": r.float()}, {"y": r})
    assert c.passed and bool(c)
    (o,) = c.outputs
    assert o.max_abs == 0 and o.needed_atol == 0 and o.cosine == pytest.approx(1.0)
    assert "within atol" in c.reason


def test_known_error_values() -> None:
    r = torch.zeros(2, 3, 4, dtype=torch.float64)
    r[0, 0, 0] = 2.0
    cand = r.clone()
    cand[0, 0, 0] = 2.5  # abs 0.5, rel 0.25
    c = compare({"y": cand}, {"y": r}, {"y": r}, tolerances=Tolerance(atol=1e-3, rtol=0.0, min_cosine=0.0, min_agreement=0.0))
    (o,) = c.outputs
    assert o.max_abs == pytest.approx(0.5)
    assert o.max_rel == pytest.approx(0.25)
    assert o.rmse_vs_fp64 == pytest.approx(math.sqrt(0.25 / 24))
    assert o.cosine == pytest.approx(1.0)  # a scaled vector keeps its direction
    assert o.needed_atol == pytest.approx(0.5)
    assert o.violations == 1 and not c.passed
    assert "would pass with atol 5.05e-01" in c.reason


def test_fp16_sized_error_passes_at_fp16_and_fails_at_fp32() -> None:
    r = _ref()
    cand = (r.half().double() + 1e-3 * _ref(1)).float()  # an fp16 round-trip plus 1e-3 noise
    assert compare({"y": cand}, {"y": r.float()}, {"y": r}, precision=Precision.FP16).passed
    strict = compare({"y": cand}, {"y": r.float()}, {"y": r}, precision=Precision.FP32)
    assert not strict.passed and "beyond atol" in strict.reason


def test_perturbed_output_fails_even_at_bf16() -> None:
    r = _ref()
    cand = r.clone()
    cand[1, 2] += 3.0  # one token's hidden state is wrong
    c = compare({"y": cand}, {"y": r}, {"y": r}, precision=Precision.BF16)
    assert not c.passed
    assert c.outputs[0].violations == 16
    assert c.outputs[0].needed_atol > Precision.BF16.tolerance.atol


def test_nan_and_inf_fail_loudly() -> None:
    r = _ref()
    cand = r.clone()
    cand[0, 0, 0], cand[0, 0, 1] = float("nan"), float("inf")
    c = compare({"y": cand}, {"y": r}, {"y": r}, precision=Precision.BF16)
    assert not c.passed
    assert "2 of 512 values are NaN or Inf" in c.reason


def test_inf_in_eager_at_precision_fails_with_its_count_and_never_widens_atol() -> None:
    r = _ref()
    at_fp16 = r.clone()
    at_fp16[1, 2, 3] = float("inf")  # eager fp16 overflowed
    wrong = r + 0.5  # off by far more than fp16's tolerance
    c = compare({"y": wrong}, {"y": r}, {"y": r}, precision=Precision.FP16, eager_at_precision={"y": at_fp16})
    (o,) = c.outputs
    assert not c.passed and math.isfinite(o.atol) and o.atol < 0.1
    assert o.nonfinite_eager == 1 and "1 of 512 values are NaN or Inf in eager at this precision" in c.reason
    assert o.violations > 0  # the elementwise check stayed on


def test_nan_in_the_reference_fails_and_never_hides_in_a_max() -> None:
    r = _ref()
    nan_ref = r.clone()
    nan_ref[0, 0, :3] = float("nan")
    c = compare({"y": r + 1.0}, {"y": nan_ref}, {"y": r})
    (o,) = c.outputs
    assert not c.passed and "3 of 512 values are NaN or Inf in eager fp32 or the fp64 shadow" in c.reason
    assert o.max_abs == pytest.approx(1.0)  # the finite elements' error, not 0 from max() dropping NaN
    assert all(math.isfinite(v) for v in (o.max_abs, o.max_rel, o.needed_atol, o.atol, o.cosine))


@pytest.mark.parametrize("bad", [dict(atol=math.inf), dict(atol=math.nan), dict(rtol=-1.0), dict(min_cosine=1.5)])
def test_a_tolerance_is_finite_and_sane(bad: dict[str, float]) -> None:
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="tolerance|at most 1"):
        Tolerance(**{"atol": 1e-4, "rtol": 1e-4, "min_cosine": 0.99, "min_agreement": 0.9, **bad})


def test_negated_output_has_cosine_minus_one() -> None:
    r = _ref()
    c = compare({"y": -r}, {"y": r}, {"y": r}, tolerances=Tolerance(atol=1e9, rtol=0, min_cosine=0.5, min_agreement=0))
    assert c.outputs[0].cosine == pytest.approx(-1.0)
    assert not c.passed and "cosine" in c.reason


def test_top1_agreement_on_logits() -> None:
    logits = torch.zeros(1, 4, 10, dtype=torch.float64)
    logits[0, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 5.0
    cand = logits.clone()
    cand[0, 0, 1], cand[0, 0, 7] = 0.0, 5.0  # one of four positions now predicts token 7
    loose = Tolerance(atol=1e9, rtol=0, min_cosine=-1, min_agreement=0.9)
    c = compare({"logits": cand}, {"logits": logits}, {"logits": logits}, task="causal-lm", tolerances=loose)
    o = c.outputs[0]
    assert o.agreement_kind == "top1" and o.agreement == pytest.approx(0.75)
    assert not c.passed and "top1 agreement 75.0%" in c.reason
    # padded positions (mask 0) do not count
    mask = torch.tensor([[0, 1, 1, 1]])
    c2 = compare({"logits": cand}, {"logits": logits}, {"logits": logits}, task="causal-lm", tolerances=loose, mask=mask)
    assert c2.outputs[0].agreement == 1.0 and c2.passed


def test_embedding_ranking_agreement() -> None:
    # Three sentences: 0 and 1 are neighbours, 2 is nearest to 1.
    h = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.2]], dtype=torch.float64).unsqueeze(1)
    swapped = h.clone()
    swapped[2] = torch.tensor([1.0, -0.1, 0.0])  # now sentence 2 is nearest to 0
    loose = Tolerance(atol=1e9, rtol=0, min_cosine=-1, min_agreement=0.99)
    c = compare({"h": swapped}, {"h": h}, {"h": h}, task="encoder", tolerances=loose)
    o = c.outputs[0]
    assert o.agreement_kind == "nn-ranking"
    assert o.agreement == pytest.approx(1 / 3)  # only sentence 1 keeps its nearest neighbour (0)
    assert not c.passed


def test_pooled_embeddings_ignore_padding() -> None:
    h = torch.tensor([[[1.0, 0.0], [0.0, 100.0]]])
    emb = pooled_embeddings(h, torch.tensor([[1, 0]]))
    assert torch.allclose(emb, torch.tensor([[1.0, 0.0]]))


def test_shadow_widens_atol_to_what_eager_costs_at_that_precision() -> None:
    r = _ref()
    eager16 = r + 0.05  # eager fp16 is itself 5e-2 off the fp64 shadow
    cand = r + 0.06
    c = compare({"y": cand}, {"y": r}, {"y": r}, precision=Precision.FP16, eager_at_precision={"y": eager16})
    o = c.outputs[0]
    assert o.atol == pytest.approx(0.2)  # shadow_factor 4 x 0.05
    assert o.min_cosine < Precision.FP16.tolerance.min_cosine
    assert c.passed and o.error_ratio == pytest.approx(1.2)


def test_per_output_tolerance() -> None:
    r = _ref()
    tol = {"a": Tolerance(atol=1.0, rtol=0, min_cosine=0, min_agreement=0)}
    c = compare({"a": r + 0.5, "b": r + 0.5}, {"a": r, "b": r}, {"a": r, "b": r}, tolerances=tol)
    by = {o.name: o for o in c.outputs}
    assert by["a"].passed and not by["b"].passed and not c.passed
    assert c.reason.startswith("b:")


def test_accumulates_worst_case_over_batches() -> None:
    comp = Comparator(Precision.FP32)
    r = _ref()
    comp.add({"y": r}, {"y": r}, {"y": r})
    comp.add({"y": r + 1e-3}, {"y": r}, {"y": r})
    c = comp.result()
    assert c.batches == 2 and c.outputs[0].max_abs == pytest.approx(1e-3) and not c.passed


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        compare({"y": torch.zeros(2, 3)}, {"y": torch.zeros(3, 2)})


def test_eager_that_gives_nan_is_refused_before_any_engine_is_judged() -> None:
    from torch import nn

    from pipeline.errors import NumericsError
    from pipeline.inputs import Shape
    from pipeline.models import ModelBundle
    from pipeline.references import References

    class _NaN(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float("nan")

    bundle = ModelBundle.from_module(_NaN(), {"x": torch.ones(2, 4)}, dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(NumericsError, match="eager fp32 itself gives NaN or Inf"):
        References.compute(bundle, [Shape(2, 4)])


class _Affine(torch.nn.Module):
    """A plain module that does not cast its inputs, as most users' modules do not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_the_shadow_and_lower_precisions_are_fed_inputs_in_their_own_dtype() -> None:
    from pipeline.inputs import Shape
    from pipeline.models import ModelBundle
    from pipeline.precision import Precision
    from pipeline.references import References

    bundle = ModelBundle.from_module(_Affine(), {"x": torch.ones(2, 4)}, dynamic_axes={"x": {0: "batch"}})
    refs = References.compute(bundle, [Shape(2)], [Precision.BF16])
    assert refs.outputs["fp64"][Shape(2)][0]["output"].dtype == torch.float64
    assert refs.outputs["bf16"][Shape(2)][0]["output"].dtype == torch.bfloat16
    assert not bundle.notes
    assert refs.judge(lambda b: {"output": bundle.module(**b)[0]}, [Shape(2)], Precision.FP32).passed


@pytest.mark.parametrize("fault", ["raises", "nan"])
def test_a_shadow_that_cannot_be_had_leaves_fp32_to_judge_alone(fault: str) -> None:
    from pipeline.inputs import Shape
    from pipeline.models import ModelBundle
    from pipeline.precision import Precision
    from pipeline.references import References

    class _NoDouble(_Affine):  # an op with no float64 kernel, or one that overflows only in fp64
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype == torch.float64 and fault == "raises":
                raise RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")
            return self.proj(x) * (float("nan") if x.dtype == torch.float64 else 1.0)

    bundle = ModelBundle.from_module(_NoDouble(), {"x": torch.ones(2, 4)}, dynamic_axes={"x": {0: "batch"}})
    said: list[str] = []
    refs = References.compute(bundle, [Shape(2)], [Precision.FP16], say=said.append)
    why = "eager fp64 fails: RuntimeError: Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double" if fault == "raises" else "eager fp64 gives NaN or Inf at 2 where fp32 does not"
    assert bundle.notes == [f"no fp64 shadow ({why}): judged against eager fp32 alone"] and bundle.notes[0] in said
    assert refs.outputs["fp64"] is refs.outputs["fp32"]
    good = refs.judge(lambda b: {"output": bundle.module(**b)[0]}, [Shape(2)], Precision.FP32)
    off = refs.judge(lambda b: {"output": bundle.module(**b)[0] + 1e-2}, [Shape(2)], Precision.FP32)
    assert good.passed and good.outputs[0].rmse_vs_fp64 == 0.0 and not off.passed
    References.compute(bundle, [Shape(2)])
    assert len(bundle.notes) == 1  # computed again for the same model: said once
