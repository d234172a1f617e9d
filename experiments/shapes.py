"""Model shapes for the prepared GPU checks: Llama 3 8B's, and a tiny one for their CPU dry runs. Weights are
seeded random: speed and memory do not depend on them, and the GPU machine cannot take real ones along."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=40960),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=4096),
}  # fmt: skip


def build_model(shape: str, dtype: torch.dtype, device: str, **overrides):
    """A seeded random Llama of `shape` (`overrides` change config fields, e.g. num_hidden_layers=1)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**SHAPES[shape], **overrides}, tie_word_embeddings=False)
    with torch.device(device):  # allocate on the GPU directly: 8B parameters in fp32 would not fit the host
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def peak_memory(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
