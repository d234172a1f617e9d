"""Shared fixtures. Nothing here may reach a hub: tests run offline on packaged models and ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data(repo_root: Path) -> Path:
    """The offline data sets: ../shared/data beside the repository (override with PYRAMIDINFER_DATA)."""
    path = Path(os.environ.get("PYRAMIDINFER_DATA") or repo_root.parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}; set PYRAMIDINFER_DATA")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct in float32 on CPU, loaded once per test session.

    Shared by every test file: do not modify the model in place (wrap it, or load your own copy).
    """
    from calibrate.models import load_model

    return load_model(None, dtype="float32", device="cpu")
