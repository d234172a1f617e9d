"""Tiny random models of every supported family, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, kv_heads: int | None = None):
    """kv_heads: override the family's KV head count (Gemma 3's tiny model has 1, like Gemma 3 270M)."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=48))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16))
    elif family == "gemma3":
        cfg = Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 6, "num_key_value_heads": kv_heads or 1},
            head_dim=16,
            sliding_window=24,
            layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
        )
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()
