"""The README's Python API example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## The Python API\n\n```python\n(.*?)```", text, re.S)
    assert code, "the README lost its API example"
    res = subprocess.run([sys.executable, "-c", code.group(1)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[0].startswith("True")
    assert (tmp_path / "artifacts/tiny-bert/onnxruntime-fp32/manifest.json").is_file()


def test_the_gpu_lane_gates_and_never_writes_its_own_baseline() -> None:
    wf = (Path(__file__).parent.parent / ".github" / "workflows" / "kiln.yml").read_text()
    gpu = wf[wf.index("  gpu:"):]
    assert "head.repo.full_name == github.repository" in gpu  # no fork's code on the self-hosted runner
    assert "--update-baseline" not in gpu.replace("kiln check build/gpu-gate/report.json --baseline .ci/baseline-gpu.json --update-baseline, and commit it", "")
    assert "exit 1" in gpu and '".[gpu,test]"' in gpu
    assert '"kiln[tvm,sign,triton,openvino]"' in (Path(__file__).parent.parent / "pyproject.toml").read_text()  # test extra pulls no onnxruntime
