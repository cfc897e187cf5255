from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.capture import Captured, capture
from pipeline.models import ModelBundle, load_model

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
