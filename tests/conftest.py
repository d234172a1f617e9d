"""Shared fixtures. Nothing here may reach a hub: tests run offline on packaged models and ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
# Triton kernels run on CPU tensors in its interpreter; it must be chosen before triton is first imported (its
# own tl.sum, tl.max are decorated then), so here, before any test module imports torch or transformers
os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a model folder with SmolLM2's tokenizer: a fast stand-in for `--model`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from calibrate.models import local_folder, resolve

    tokenizer = AutoTokenizer.from_pretrained(local_folder(resolve(None)))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
