"""The registry, availability, options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

import backends as registry
from backends.base import Availability, Backend, BackendOptions, ok, runtime_option
from backends.inductor import InductorOptions
from backends.ort import OrtOptions
from pipeline.errors import BackendError, InputError, UnknownChoiceError
from pipeline.precision import Precision


def test_builtin_backends_are_registered() -> None:
    assert {"eager", "inductor", "onnxruntime"} <= set(registry.names())


def test_unknown_backend_names_the_valid_ones() -> None:
    with pytest.raises(UnknownChoiceError, match="valid: .*eager.*onnxruntime"):
        registry.get("tensorflow")


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("eager").__class__())


def test_the_catalog_agrees_with_each_backend_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kiln backends` answers from BUILTIN without importing a backend: its devices and precisions
    must be the classes' own, and its quick availability must agree with the deep check here."""
    for name, entry in registry.BUILTIN.items():
        b = registry.get(name)
        assert entry.devices == tuple(b.devices), name
        assert entry.precisions == tuple(p.value for p in b.precisions), name
        for device in ("cpu", "cuda"):
            quick, deep = registry.quick_availability(name, device), b.availability(device)
            assert quick.startswith("available") == bool(deep), (name, device, quick, str(deep))
    assert registry.known_names()[:len(registry.BUILTIN)] == list(registry.BUILTIN)
    assert "exported-program" in registry.known_names()  # the test plugin, by its entry point, not imported
    plugin = registry.get("exported-program")  # loaded: its own check
    assert registry.quick_availability("exported-program", "cpu") == str(plugin.availability("cpu"))
    monkeypatch.delitem(registry._REGISTRY, "exported-program")  # as a fresh `kiln backends` sees it: not imported
    assert registry.quick_availability("exported-program", "cpu").startswith("a plugin (plugin_backend:")


class _Broken(Backend):
    name = "broken-for-test"
    support = {Precision.FP32: ok()}

    def _check(self, device: str) -> Availability:
        raise ImportError("libfoo.so: cannot open shared object file")

    def _compile(self, captured: Any, spec: Any, shapes: Any) -> Any:
        raise AssertionError("never reached")

    def _load(self, directory: Any, spec: Any, manifest: Any) -> Any:
        raise AssertionError("never reached")


def test_availability_never_raises_and_compile_refuses(tiny_captured: Any) -> None:
    b = _Broken()
    a = b.availability("cpu")
    assert not a and str(a) == "unavailable: ImportError: libfoo.so: cannot open shared object file"
    with pytest.raises(BackendError, match="libfoo"):
        b.compile(tiny_captured)


def test_cuda_without_a_device_is_unavailable() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    a = registry.get("eager").availability("cuda")
    assert not a and a.reason == "no CUDA device"


def test_unsupported_precision_has_a_reason(tiny_captured: Any) -> None:
    ort = registry.get("onnxruntime")
    assert not ort.supports(Precision.BF16, "cpu")
    with pytest.raises(BackendError, match="bf16"):
        ort.compile(tiny_captured, Precision.BF16)


def test_options_reject_unknown_keys_and_list_valid_ones() -> None:
    with pytest.raises(InputError, match="unknown option.*mdoe.*valid: mode, freezing, dynamic"):
        InductorOptions.from_mapping({"mdoe": "max-autotune"})


def test_options_coerce_strings_from_the_command_line() -> None:
    o = InductorOptions.from_mapping({"mode": "max-autotune", "freezing": "false", "dynamic": "none"})
    assert o == InductorOptions(mode="max-autotune", freezing=False, dynamic=None)
    assert OrtOptions.from_mapping({"intra_op_threads": "4"}).intra_op_threads == 4
    with pytest.raises(InputError, match="valid: default"):
        InductorOptions.from_mapping({"mode": "fastest"})
    with pytest.raises(InputError, match="not a valid"):
        OrtOptions.from_mapping({"intra_op_threads": "many"})


def test_options_are_frozen_with_defaults_in_one_place() -> None:
    o = InductorOptions()
    with pytest.raises(Exception):
        o.mode = "max-autotune"  # type: ignore[misc]
    assert InductorOptions.from_mapping({}) == o


@dataclass(frozen=True)
class _Opts(BackendOptions):
    level: int = 3
    threads: int = runtime_option(0)


def test_only_build_options_enter_the_cache_key() -> None:
    assert _Opts(threads=8).build_options() == {"level": 3}
    assert OrtOptions().build_options() == {"fuse": True, "transformers_optimizer": True, "graph_optimization": "all"}


def test_one_support_table_answers_for_forward_and_generation() -> None:
    """Each built-in backend names every built-in precision once, built or refused with its reason;
    the same table says where the generation steps are built."""
    builtin = [Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8, Precision.INT8_DYNAMIC]
    for name in registry.BUILTIN:
        assert set(builtin) <= set(registry.get(name).support), name
    ort, eager = registry.get("onnxruntime"), registry.get("eager")
    assert ort.supports(Precision.FP16, "cpu") and not ort.supports(Precision.FP16, "cpu", generate=True)
    assert ort.supports(Precision.FP16, "cpu", generate=True).reason == "onnxruntime generation runs fp32 so far (fp16 is not built)"
    assert "bf16 kernels" in ort.supports(Precision.BF16, "cpu").reason and Precision.BF16 not in ort.precisions
    assert eager.supports(Precision.INT8_DYNAMIC, "cpu", generate=True) and not eager.supports(Precision.INT8, "cpu", generate=True)
    assert "CPU only" in eager.supports(Precision.INT8, "cuda").reason
