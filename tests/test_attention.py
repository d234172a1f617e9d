"""The decode attention with each KV head's query group packed as query rows, against the paths it replaces."""

from __future__ import annotations

import pytest
import torch
from test_ragged import head_schedule, layer_heads
from test_runtime import GREEDY, left_pad, prompts, schedule_for
from tiny_models import FAMILIES, tiny_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import runtime
from runtime import attention


class _Module:  # what transformers' SDPA reads off an attention module
    def __init__(self, groups: int):
        self.num_key_value_groups, self.is_causal = groups, True


@pytest.mark.parametrize("kv_heads, groups", [(2, 3), (1, 4), (3, 2)])
@pytest.mark.parametrize("mask", [None, "shared", "per query head"])
def test_packed_decode_equals_stock_sdpa(kv_heads, groups, mask):
    g = torch.Generator().manual_seed(0)
    b, t, d = 3, 37, 16
    q = torch.randn(b, kv_heads * groups, 1, d, generator=g)
    k, v = (torch.randn(b, kv_heads, t, d, generator=g) for _ in range(2))
    if mask == "shared":
        mask = torch.rand(b, 1, 1, t, generator=g) > 0.3
    elif mask == "per query head":  # as a split layer's mask comes: each KV head's row repeated over its group
        mask = (torch.rand(b, kv_heads, 1, t, generator=g) > 0.3).repeat_interleave(groups, dim=1)
    if mask is not None:
        mask[..., 0] = True  # every query sees something
    stock, _ = sdpa_attention_forward(_Module(groups), q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(attention.decode_packed(q, k, v, mask, 0.3), stock, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_head", [False, True])
def test_generation_with_packed_decode_equals_the_stock_sdpa_path(family, per_head, monkeypatch):
    """Greedy on a left-padded batch across decode-time trims: the same tokens, logits within float tolerance, with
    the packed path on (and taken) and off (every call through transformers' SDPA)."""
    model = tiny_model(family, kv_heads=2)
    sched = (
        head_schedule(layer_heads(model), decode=runtime.Decode(interval=8))
        if per_head
        else schedule_for(model, decode=runtime.Decode(interval=8))
    )
    ids, mask = left_pad(prompts())
    packed = []
    original = attention.decode_packed
    monkeypatch.setattr(attention, "decode_packed", lambda *a: packed.append(1) or original(*a))
    runs = {}
    for on in (True, False):
        if not on:
            monkeypatch.setattr(attention, "_packs", lambda *a: False)
        with runtime.apply(model, sched):
            runs[on] = model.generate(ids, attention_mask=mask, max_new_tokens=24, return_dict_in_generate=True,
                                      output_scores=True, **GREEDY)  # fmt: skip
        if on:
            assert packed, "no decode step took the packed path"
            packed.clear()
    assert not packed
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for a, b in zip(runs[True].scores, runs[False].scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
