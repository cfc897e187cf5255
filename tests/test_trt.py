"""TensorRT: everything that does not need the library (which cannot be installed here).
The calls into TensorRT itself are type-checked against tensorrt-stubs by scripts/typecheck.py."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import backends as registry
from backends.tensorrt.builder import TrtOptions, build_engine, parser_errors, precision_flags
from backends.tensorrt.engine import check_engine_facts, engine_facts, library_check, torch_dtype
from backends.tensorrt.profile import check_shapes, input_profile, profile_shapes
from backends.tensorrt.torch_trt import TorchTrtOptions
from pipeline.errors import ArtifactError, BackendError, InputError, ShapeError
from pipeline.inputs import Shape
from pipeline.models import ModelBundle
from pipeline.precision import Precision

RUN = [Shape(1, 16), Shape(8, 128), Shape(4, 64)]


def test_unavailable_here_with_every_reason() -> None:
    for name, module in (("tensorrt", "tensorrt"), ("torch-tensorrt", "torch_tensorrt")):
        a = registry.get(name).availability("cpu")
        assert not a
        assert "TensorRT runs on CUDA devices, not cpu" in a.reason
        if module not in sys.modules:
            assert f"{module} is not installed" in a.reason


def test_type_stubs_alone_do_not_count_as_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tensorrt-stubs installs tensorrt/__init__.pyi, which imports as an empty namespace package.
    (tmp_path / "fake_trt_stub").mkdir()
    (tmp_path / "fake_trt_stub" / "__init__.pyi").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    a = library_check("fake_trt_stub")
    assert not a and "type stubs only, not the library" in a.reason


def test_profile_from_the_runs_shapes(tiny_bert: ModelBundle) -> None:
    mn, opt, mx = profile_shapes(tiny_bert, RUN, TrtOptions())
    assert (mn, opt, mx) == (Shape(1, 16), Shape(8, 128), Shape(8, 128))
    prof = input_profile(tiny_bert, (mn, opt, mx))
    assert prof == {"input_ids": ((1, 16), (8, 128), (8, 128)), "attention_mask": ((1, 16), (8, 128), (8, 128))}


def test_profile_from_the_user_and_from_the_model(tiny_bert: ModelBundle) -> None:
    o = TrtOptions(profile_max="16x256")
    assert profile_shapes(tiny_bert, RUN, o) == (Shape(1, 16), Shape(8, 128), Shape(16, 256))
    assert profile_shapes(tiny_bert, [], TrtOptions()) == (Shape(1, 1), Shape(1, 128), Shape(64, 256))


@pytest.mark.parametrize("opts, match", [
    (TrtOptions(profile_min="16x16"), "min <= opt <= max"),
    (TrtOptions(profile_max="8x1024"), "leaves tiny-bert's range"),
])
def test_bad_profiles_are_refused(tiny_bert: ModelBundle, opts: TrtOptions, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        profile_shapes(tiny_bert, RUN, opts)


def test_shapes_are_checked_against_the_profile() -> None:
    prof = {"input_ids": ((1, 16), (8, 128), (8, 128))}
    check_shapes(prof, {"input_ids": (4, 100)})
    with pytest.raises(ShapeError, match=r"shape \(9, 100\), outside the engine's profile \(1, 16\)..\(8, 128\)"):
        check_shapes(prof, {"input_ids": (9, 100)})
    with pytest.raises(ShapeError):
        check_shapes(prof, {"input_ids": (4,)})
    with pytest.raises(InputError, match="not an engine input"):
        check_shapes(prof, {"token_type_ids": (1, 16)})


def test_precision_flags() -> None:
    assert precision_flags(Precision.FP32, False) == ([], [])
    assert precision_flags(Precision.FP16, False) == ([], ["FP16"])
    assert precision_flags(Precision.BF16, False) == ([], ["BF16"])
    for p in Precision:  # strongly typed: the graph's types, no precision flags
        assert precision_flags(p, True) == (["STRONGLY_TYPED"], [])


def test_options_are_validated() -> None:
    with pytest.raises(InputError, match="outside 0..5"):
        TrtOptions.from_mapping({"optimization_level": "7"})
    with pytest.raises(ShapeError, match="malformed shape"):
        TrtOptions.from_mapping({"profile_max": "big"})
    with pytest.raises(InputError, match="unknown option.*workspace"):
        TrtOptions.from_mapping({"workspace": "1"})
    with pytest.raises(InputError, match="outside 0..5"):
        TorchTrtOptions(optimization_level=9)
    o = TrtOptions.from_mapping({"strongly_typed": "true", "workspace_mb": "1024"})
    assert o.strongly_typed and o.workspace_mb == 1024 and "workspace_mb" in o.build_options()


def test_engine_facts_round_trip_and_refusals() -> None:
    prof = {"input_ids": ((1, 16), (8, 128), (8, 128))}
    gpu = {"name": "NVIDIA H100", "capability": "sm_90"}
    facts = json.loads(json.dumps(engine_facts(prof, "10.13.0", gpu)))  # as the manifest's engine section keeps them
    assert check_engine_facts(facts, "10.13.0", gpu) == prof
    with pytest.raises(ArtifactError, match="built with TensorRT 10.13.0, this is TensorRT 10.14.1"):
        check_engine_facts(facts, "10.14.1", gpu)
    with pytest.raises(ArtifactError, match="built for sm_90, this GPU is sm_80"):
        check_engine_facts(facts, "10.13.0", {"capability": "sm_80"})
    with pytest.raises(ArtifactError, match="no TensorRT profile"):
        check_engine_facts({"tensorrt": "10.13.0", "gpu": gpu}, "10.13.0", gpu)


def test_dtype_mapping() -> None:
    assert torch_dtype("HALF") == torch.float16 and torch_dtype("BF16") == torch.bfloat16 and torch_dtype("INT64") == torch.int64
    with pytest.raises(BackendError, match="FP8"):
        torch_dtype("FP8")


class _Err:
    def __init__(self, node: str, op: str, desc: str) -> None:
        self._n, self._o, self._d = node, op, desc

    def node_name(self) -> str:
        return self._n

    def node_operator(self) -> str:
        return self._o

    def desc(self) -> str:
        return self._d


def test_parser_errors_name_the_node() -> None:
    p = types.SimpleNamespace(num_errors=2, get_error=lambda i: [_Err("/attn/Einsum", "Einsum", "unsupported equation"),
                                                                 _Err("", "", "network has no outputs")][i])
    assert parser_errors(p) == "node /attn/Einsum (Einsum): unsupported equation; network has no outputs"


def _fake_tensorrt(parse_ok: bool, build_ok: bool, calls: list[Any]) -> types.ModuleType:
    """The smallest stand-in for the tensorrt module that build_engine's call sequence needs."""
    trt = types.ModuleType("tensorrt")

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    class Config:
        builder_optimization_level = 3

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            calls.append(("workspace", size))

        def set_flag(self, flag: Any) -> None:
            calls.append(("flag", flag))

        def add_optimization_profile(self, p: Any) -> int:
            calls.append(("profile", p.shapes))
            return 0

        def create_timing_cache(self, data: bytes) -> Any:
            calls.append(("timing_cache_in", data))
            return "cache"

        def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
            return True

        def get_timing_cache(self) -> Any:
            return types.SimpleNamespace(serialize=lambda: b"TIMING")

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, Any] = {}

        def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
            self.shapes[name] = (mn, opt, mx)

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Any:
            calls.append(("network_flags", flags))
            return "network"

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Any, config: Any) -> Any:
            if not build_ok:
                self.logger.log(ILogger.Severity.ERROR, "out of workspace memory")
                return None
            return b"ENGINE"

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network: Any, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return parse_ok

        def get_error(self, i: int) -> _Err:
            return _Err("/Gather_3", "Gather", "INT64 indices out of range")

    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, OnnxParser  # type: ignore[attr-defined]
    trt.Dims = list  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)  # type: ignore[attr-defined]
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16")  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    return trt


PROF = {"input_ids": ((1, 16), (8, 128), (8, 128))}


def test_build_sequence_flags_profile_and_timing_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(True, True, calls))
    cache = tmp_path / "timing.cache"
    assert build_engine(tmp_path / "m.onnx", PROF, Precision.FP16, TrtOptions(workspace_mb=512), cache) == b"ENGINE"
    assert ("flag", "FP16") in calls and ("workspace", 512 << 20) in calls and ("network_flags", 0) in calls
    assert ("profile", {"input_ids": ([1, 16], [8, 128], [8, 128])}) in calls
    assert cache.read_bytes() == b"TIMING"  # persisted ...
    calls.clear()
    build_engine(tmp_path / "m.onnx", PROF, Precision.BF16, TrtOptions(strongly_typed=True), cache)
    assert ("timing_cache_in", b"TIMING") in calls  # ... and reused by the next build
    assert ("network_flags", 2) in calls and not [c for c in calls if c[0] == "flag"]


def test_parse_and_build_failures_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(False, True, []))
    with pytest.raises(BackendError, match=r"ONNX parser refused the model: node /Gather_3 \(Gather\): INT64 indices"):
        build_engine(tmp_path / "m.onnx", PROF, Precision.FP32, TrtOptions(), None)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(True, False, []))
    with pytest.raises(BackendError, match="could not build the engine: out of workspace memory"):
        build_engine(tmp_path / "m.onnx", PROF, Precision.FP32, TrtOptions(), None)


def test_a_run_reports_tensorrt_as_unavailable(tmp_path: Path, cache_dir: Path) -> None:
    from pipeline import run

    r = run("tiny-bert", backends="tensorrt,torch-tensorrt", shapes="1x8", device="cpu", rounds=2, warmup=1,
            cache_dir=cache_dir, out=tmp_path)
    for name in ("tensorrt", "torch-tensorrt"):
        row = r.find(name, "fp32", "1x8")
        assert row is not None and row.status == "unavailable" and "CUDA" in row.reason
    assert "unavailable" in (tmp_path / "report.md").read_text()


def test_generation_profiles_span_the_runs_batches_and_prompts_over_a_static_cache() -> None:
    """The generation steps are models of their own: the forward profile code spans batch (and,
    for prefill, the prompt) and keeps the cache's positions static."""
    from torch import nn

    from backends.tensorrt.profile import ProfileOptions, input_profile, profile_shapes
    from pipeline.errors import ShapeError
    from pipeline.decoding import CacheSpec
    from pipeline.generate import decode_shapes, step_bundle
    from pipeline.inputs import Shape
    from pipeline.models import load_model

    spec = CacheSpec(layers=2, heads=4, head_dim=16, max_len=192)
    bundle = load_model("tiny-gpt2")
    steps = [step_bundle(bundle, spec, nn.Identity(), prefill) for prefill in (True, False)]
    shapes = [Shape(1, 128), Shape(8, 64)]
    prefill, decode = (input_profile(b, profile_shapes(b, s, ProfileOptions())) for b, s in zip(steps, (shapes, decode_shapes(shapes))))
    assert prefill["input_ids"] == ((1, 64), (8, 64), (8, 128))  # opt: the largest shape's
    assert decode["input_ids"] == ((1, 1), (8, 1), (8, 1)) and decode["start"] == ((), (), ())
    for p in (prefill, decode):
        assert set(p) == {"input_ids", "start", "k_0", "v_0", "k_1", "v_1"}
        assert p["k_1"] == ((1, 4, 192, 16), (8, 4, 192, 16), (8, 4, 192, 16))  # positions static, batch varies
    with pytest.raises(ShapeError, match=r"seq \[1, 192\]"):
        profile_shapes(steps[0], [Shape(1, 200)], ProfileOptions())
