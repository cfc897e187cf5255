from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path


def _declare_plugin_backend() -> None:
    """A distribution on sys.path whose entry point in `kiln.backends` names tests/plugin_backend.py,
    as `pip install` of a third-party backend would leave it; before anything reads the registry."""
    site = Path(tempfile.mkdtemp(prefix="kiln-test-plugin-"))
    atexit.register(shutil.rmtree, site, True)
    dist = site / "kiln_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kiln-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kiln.backends]\nexported-program = plugin_backend:ExportedProgramBackend\n")
    sys.path.append(str(site))
    sys.path.insert(0, str(Path(__file__).parent))


_declare_plugin_backend()

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.capture import Captured, capture  # noqa: E402
from pipeline.models import ModelBundle, load_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kiln-cache")


@pytest.fixture(scope="session")
def tiny_bert() -> ModelBundle:
    return load_model("tiny-bert")


@pytest.fixture(scope="session")
def tiny_captured(tiny_bert: ModelBundle, cache_dir: Path) -> Captured:
    return capture(tiny_bert, cache_dir)
