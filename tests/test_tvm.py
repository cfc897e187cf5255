"""Apache TVM on the CPU: an untuned dynamic build that passes the comparator, a library reloaded
in a process that has only tvm and numpy, tuning with its database reused, a CUDA library built here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import backends as registry
from pipeline.capture import capture
from pipeline.errors import ShapeError
from pipeline.inputs import Shape, make_inputs
from pipeline.models import ModelBundle
from pipeline.precision import Precision
from pipeline.references import References

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e '.[tvm]')")
pytestmark = pytest.mark.tvm


def _check(model: Any, bundle: ModelBundle, shapes: list[Shape], precision: Precision = Precision.FP32) -> Any:
    return References.compute(bundle, shapes, [precision]).judge(model, shapes, precision)


@pytest.fixture(scope="module")
def untuned(tiny_captured: Any) -> Any:
    return registry.get("tvm").compile(tiny_captured, Precision.FP32, "cpu", {"trials_per_task": 0})


def test_untuned_dynamic_build_matches_eager_and_says_it_is_untuned(untuned: Any, tiny_captured: Any) -> None:
    verdict = _check(untuned, tiny_captured.bundle, [Shape(1, 16), Shape(3, 40)])  # one build, two shapes
    assert verdict.passed, verdict.reason
    info = untuned.describe()
    assert info["shapes"] == "dynamic" and "untuned" in info["warning"]
    assert 0 < info["kernels_after_fusion"] < 80


def test_fp16_through_to_mixed_precision(tiny_captured: Any) -> None:
    model = registry.get("tvm").compile(tiny_captured, Precision.FP16, "cpu", {"trials_per_task": 0})
    verdict = _check(model, tiny_captured.bundle, [Shape(2, 16)], Precision.FP16)
    assert verdict.passed, verdict.reason
    assert not registry.get("tvm").supports(Precision.BF16, "cpu")


def _run_with_only_tvm_and_numpy(code: str, tmp_path: Path) -> str:
    blocked = tmp_path / "blocked"  # torch, transformers and Kiln itself cannot be imported there
    for name in ("torch", "transformers", "pipeline", "backends"):
        (blocked / name).mkdir(parents=True, exist_ok=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not available here')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_library_reloads_in_a_process_with_only_tvm_and_numpy(untuned: Any, tiny_captured: Any, tmp_path: Path) -> None:
    engine = tmp_path / "engine"  # a directory of its own: an engine holds only the files its manifest lists
    untuned.save(engine)
    x = make_inputs(tiny_captured.bundle, Shape(2, 12), "padded")
    expected = untuned(x)["last_hidden_state"].numpy()
    import numpy as np

    np.savez(tmp_path / "io.npz", input_ids=x["input_ids"].numpy(), attention_mask=x["attention_mask"].numpy(), expected=expected)
    code = (
        "import sys, numpy as np, tvm\n"
        "from tvm import relax\n"
        f"io = np.load({str(tmp_path / 'io.npz')!r})\n"
        f"vm = relax.VirtualMachine(tvm.runtime.load_module({str(engine / 'model.so')!r}), tvm.cpu())\n"
        "out = vm['main'](tvm.runtime.tensor(io['input_ids']), tvm.runtime.tensor(io['attention_mask'])).numpy()\n"
        "assert np.allclose(out, io['expected'], atol=1e-5), abs(out - io['expected']).max()\n"
        "print('ok', out.shape)\n"
    )
    assert "ok (2, 12, 32)" in _run_with_only_tvm_and_numpy(code, tmp_path)
    loaded = registry.get("tvm").load(engine)
    assert torch.allclose(loaded(x)["last_hidden_state"], torch.from_numpy(expected))


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.gelu(self.a(x)))


def test_cuda_library_builds_on_the_cpu_machine(tiny_captured: Any, tmp_path: Path) -> None:
    from backends.tvm.lower import cuda_library

    lib, n_kernels = cuda_library(tiny_captured, "sm_90")
    assert n_kernels > 0
    path = tmp_path / "model-cuda.so"
    lib.export_library(str(path))
    # The runtime here has no CUDA loader; what can be inspected is the CUDA source inside.
    assert path.read_bytes().count(b'extern "C" __global__') >= n_kernels // 2


def test_the_budget_check_waits_until_every_kernel_has_a_schedule() -> None:
    import time

    from backends.tvm.tune import BudgetSpent, _budget_callback, check_budget

    check_budget(time.monotonic() + 3600, 0, 5, 5)  # within budget: tuning goes on
    check_budget(time.monotonic() - 1, 3, 4, 5)  # past it, but one task was never measured
    with pytest.raises(BudgetSpent, match="budget spent at task 3"):
        check_budget(time.monotonic() - 1, 3, 5, 5)
    assert _budget_callback(time.monotonic()) is not None  # MetaSchedule accepts it as a MeasureCallback


@pytest.mark.slow
def test_a_spent_budget_stops_real_tuning_after_one_round(tmp_path: Path) -> None:
    bundle = ModelBundle.from_module(_Mlp(), {"x": torch.randn(2, 16)}, name="mlp", dynamic_axes={"x": {0: "batch"}})
    captured = capture(bundle, tmp_path)
    model = registry.get("tvm").compile(captured, Precision.FP32, "cpu", {"trials_per_task": 64, "budget_s": 0}, [Shape(4, 1)])
    info = model.describe()
    assert info["tuning"]["4x1"]["hit_budget"] is True
    assert "budget reached" in info["note"] and "warning" not in info
    assert info["kernels_unscheduled"]["4x1"] == []  # stopped only once every kernel had a schedule
    (work,) = [p for p in (tmp_path / "tvm").iterdir() if p.is_dir()]  # beside it: its lock file
    records = [json.loads(line) for line in (work / "database_tuning_record.json").read_text().splitlines()]
    # every task measured once (one round of at most 16 trials each), far short of 64 per task
    assert 0 < len(records) <= 16 * info["kernels_after_fusion"]["4x1"]
    assert json.loads((work / "kiln-tuned.json").read_text())["hit_budget"] is True
    x = make_inputs(bundle, Shape(4, 1))
    with torch.no_grad():
        assert torch.allclose(model(x)["output"], bundle.module(**x)[0], atol=1e-4)
    # the same budget again: that database is what this budget buys, so it is reused
    again = registry.get("tvm").compile(captured, Precision.FP32, "cpu", {"trials_per_task": 64, "budget_s": 0}, [Shape(4, 1)])
    assert again.describe()["tuning"]["4x1"]["reused"] is True


@pytest.mark.slow
def test_an_untuned_build_says_so_in_the_report(tmp_path: Path, cache_dir: Path) -> None:
    from pipeline import run

    report = run("tiny-bert", backends="tvm", shapes="2x8", device="cpu", rounds=2, warmup=1, cache_dir=cache_dir,
                 options={"tvm": {"trials_per_task": 0}}, out=tmp_path)
    row = report.find("tvm", "fp32", "2x8")
    assert row is not None and row.status == "ok" and "untuned TVM build" in row.reason
    assert "untuned TVM build" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_a_tuning_killed_mid_way_leaves_a_database_the_next_build_can_use_and_the_next_reuses(tmp_path: Path) -> None:
    import signal
    import time

    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_tvm import _Mlp\n"
        "import backends as registry\n"
        "from pipeline.capture import capture\n"
        "from pipeline.inputs import Shape\n"
        "from pipeline.models import ModelBundle\n"
        "from pipeline.precision import Precision\n"
        "b = ModelBundle.from_module(_Mlp(), {'x': torch.randn(2, 16)}, name='mlp', dynamic_axes={'x': {0: 'batch'}})\n"
        f"c = capture(b, {str(tmp_path)!r})\n"
        "registry.get('tvm').compile(c, Precision.FP32, 'cpu', {'trials_per_task': 64, 'budget_s': 600}, [Shape(4, 1)])\n"
    )
    victim = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    records: list[Path] = []
    while time.monotonic() < deadline and victim.poll() is None:
        records = [p for p in (tmp_path / "tvm").glob("*/database_tuning_record.json") if p.read_text().count("\n") >= 2]
        if records:
            break
        time.sleep(0.2)
    assert records, "the tuning never wrote a record"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    with records[0].open("a") as f:
        f.write('[0, [["half a rec')  # as if killed in the middle of a write
    bundle = ModelBundle.from_module(_Mlp(), {"x": torch.randn(2, 16)}, name="mlp", dynamic_axes={"x": {0: "batch"}})
    captured = capture(bundle, tmp_path)
    opts = {"trials_per_task": 2, "budget_s": 400}
    # the killed tuning was never marked done: this build tunes (resuming from its whole records),
    # and the build after it reuses what this one finished (one test, so the tuning is paid once)
    first = registry.get("tvm").compile(captured, Precision.FP32, "cpu", opts, [Shape(4, 1)])
    tuning = first.describe()["tuning"]["4x1"]
    assert tuning["reused"] is False and tuning["trials_per_task"] == 2
    (work,) = [p for p in (tmp_path / "tvm").iterdir() if p.is_dir()]  # beside it: its lock file
    lines = (work / "database_tuning_record.json").read_text().splitlines()
    assert lines and json.loads((work / "kiln-tuned.json").read_text())["trials_per_task"] == 2
    second = registry.get("tvm").compile(captured, Precision.FP32, "cpu", opts, [Shape(4, 1)])
    assert second.describe()["tuning"]["4x1"]["reused"] is True
    # TVM's x86 default is half the logical CPUs; Kiln gives it torch's thread count, and says so
    assert second.describe()["threads"] == int(os.environ["TVM_NUM_THREADS"]) == torch.get_num_threads()
    x = make_inputs(bundle, Shape(4, 1))
    with torch.no_grad():
        assert torch.allclose(first(x)["output"], bundle.module(**x)[0], atol=1e-4)
        assert torch.allclose(second(x)["output"], bundle.module(**x)[0], atol=1e-4)
    with pytest.raises(ShapeError, match="tuned for the static shapes 4x1"):
        second(make_inputs(bundle, Shape(3, 1)))
    # the tuned library (weights repacked at build time, embedded) runs without Kiln or torch
    import numpy as np

    second.save(tmp_path / "engine")
    assert json.loads((tmp_path / "engine" / "manifest.json").read_text())["engine"]["threads"] == torch.get_num_threads()
    with torch.no_grad():
        np.savez(tmp_path / "io.npz", x=x["x"].numpy(), expected=bundle.module(**x)[0].numpy())
    code = (
        "import numpy as np, tvm\n"
        "from tvm import relax\n"
        f"io = np.load({str(tmp_path / 'io.npz')!r})\n"
        f"vm = relax.VirtualMachine(tvm.runtime.load_module({str(tmp_path / 'engine' / 'model-4x1.so')!r}), tvm.cpu())\n"
        "out = vm['main'](tvm.runtime.tensor(io['x'])).numpy()\n"
        "assert np.allclose(out, io['expected'], atol=1e-4), abs(out - io['expected']).max()\n"
        "print('ok', out.shape)\n"
    )
    assert "ok (4, 8)" in _run_with_only_tvm_and_numpy(code, tmp_path)


def test_an_embedding_table_keeps_its_layout_when_tuning_may_rewrite_weights(cache_dir: Path) -> None:
    """MetaSchedule rewrote GPT-2's embedding tables for the one-token decode step into a buffer
    indexed by `id % 2` (wrong keys from the first layer on); a gather's table is never offered
    for layout rewrite, the matmuls' weights still are."""
    from backends.tvm.lower import bind_shape, import_program, lower, target_for
    from pipeline.generate import capture_generation
    from pipeline.models import load_model

    decode = capture_generation(load_model("tiny-gpt2"), 14, cache_dir=cache_dir).steps[1]  # type: ignore[index]
    dims = {n: s.dims for n, s in decode.bundle.inputs.items()}
    mod = lower(bind_shape(import_program(decode), Shape(1, 1), dims), target_for("cpu", None), Precision.FP32, True, prepack=True)
    free = {str(g.name_hint): f.attrs is not None and "layout_free_buffers" in f.attrs
            for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    takes = [n for n in free if n.startswith("take")]
    assert len(takes) == 2 and not any(free[n] for n in takes)  # token and position embeddings
    assert any(v for n, v in free.items() if "matmul" in n)
