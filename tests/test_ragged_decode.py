"""The one-launch decode kernel for layers whose KV heads keep different shares (`runtime.ragged_decode`), run on
CPU by Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), against the per-head SDPA path it replaces:
the kernel alone (lengths over several splits, invalid slots, query groups, head sizes, strided views), then
generation under `ragged_kernel=True`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_ragged import head_schedule, layer_heads
from test_runtime import GREEDY, left_pad, prompts
from tiny_models import FAMILIES, tiny_model

import runtime
from runtime import attention
from runtime import ragged_decode as rd
from runtime.cache import RaggedLayer

pytest.importorskip("triton", reason="Triton has no wheel for this platform (the [test] extra brings it on Linux)")


def per_head_sdpa(query, keys, values, valid, scaling, has_invalid):
    """What the attention function does without the kernel: SDPA per KV head with its query group, [B, 1, Hq, D]."""
    g = query.shape[1] // len(keys)
    outs = []
    for h, (k, v, ok) in enumerate(zip(keys, values, valid, strict=True)):
        mask = ok[:, :, None, :] if has_invalid else None
        q = query[:, h * g : (h + 1) * g]
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True))
    return torch.cat(outs, 1).transpose(1, 2)


@pytest.mark.parametrize(
    ("lengths", "group", "dim", "dtype", "has_invalid"),
    [
        ([1100, 37, 513], 3, 64, torch.float32, False),  # 3, 1 and 2 splits of 512 slots
        ([1100, 37, 513], 3, 64, torch.float32, True),
        ([40, 300], 4, 80, torch.float32, True),  # head size not a power of two
        ([700, 90, 5, 1024], 1, 32, torch.bfloat16, True),
    ],
)
def test_kernel_equals_attention_head_by_head(lengths, group, dim, dtype, has_invalid):
    g = torch.Generator().manual_seed(len(lengths) * dim)
    b = 3
    # keys as views of larger buffers (spare room, like a head's buffer), values as a split of a [B, H, T, D] layer
    keys = [torch.randn(b, 1, n + 7, dim, generator=g).to(dtype)[:, :, :n] for n in lengths]
    wide = torch.randn(b, len(lengths), max(lengths), dim, generator=g).to(dtype)
    values = [wide[:, h : h + 1, :n] for h, n in enumerate(lengths)]
    valid = [torch.rand(b, 1, n, generator=g) > 0.3 for n in lengths]
    for ok in valid:
        ok[..., 0] = True  # every row sees something (its sinks)
    query = torch.randn(b, len(lengths) * group, 1, dim, generator=g).to(dtype)
    got = rd.ragged_decode(query, keys, values, valid, dim**-0.5, has_invalid)
    want = per_head_sdpa(query.float(), [k.float() for k in keys], [v.float() for v in values], valid, dim**-0.5,
                         has_invalid)  # fmt: skip
    assert got.shape == (b, 1, len(lengths) * group, dim) and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    if has_invalid:  # the mask matters: without it the answer differs
        assert not torch.allclose(rd.ragged_decode(query, keys, values, valid, dim**-0.5, False).float(), want)


def test_merging_splits_equals_one_softmax():
    g = torch.Generator().manual_seed(0)
    scores, v = torch.randn(2, 3, 4, 1000, generator=g), torch.randn(2, 3, 1000, 16, generator=g)
    parts = [(s, vv) for s, vv in zip(scores.split(300, -1), v.split(300, 2), strict=True)]
    m = torch.stack([s.amax(-1) for s, _ in parts], 2)
    total = torch.stack([torch.exp(s - s.amax(-1, keepdim=True)).sum(-1) for s, _ in parts], 2)
    acc = torch.stack([torch.exp(s - s.amax(-1, keepdim=True)) @ vv for s, vv in parts], 2)
    torch.testing.assert_close(rd.merge_splits(m, total, acc), torch.softmax(scores, -1) @ v)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_the_kernel_equals_the_per_head_path(family, monkeypatch):
    """Greedy on a left-padded batch across decode-time trims: the same tokens, logits within float tolerance, and
    every split layer's decode attention went through the kernel (but where a sliding window cuts), reading the
    layer's flat buffers through the table it keeps."""
    model = tiny_model(family, kv_heads=2)
    sched = head_schedule(layer_heads(model), decode=runtime.Decode(interval=16))
    ids, mask = left_pad(prompts())
    runs = {}
    calls = []
    original = rd.ragged_decode
    # each call records whether the layer's kept table came with it (the flat buffers, read in place)
    monkeypatch.setattr(
        attention, "ragged_decode", lambda *a, **k: calls.append(k["table"] is not None) or original(*a, **k)
    )
    for kernel in (False, True):
        with runtime.apply(model, sched, ragged_kernel=kernel):
            runs[kernel] = model.generate(ids, attention_mask=mask, max_new_tokens=24, return_dict_in_generate=True,
                                          output_scores=True, **GREEDY)  # fmt: skip
        if not kernel:
            assert not calls
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for a, b in zip(runs[True].scores, runs[False].scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    split = [layer for layer in runtime.cache_of(runs[True]).layers if isinstance(layer, RaggedLayer)]
    # Mistral's window (48) is shorter than the prompt: its layers stay on the per-head path, which masks the window
    windowed = [layer for layer in split if layer.heads[0].sliding_window is not None]
    assert split and len(calls) == (len(split) - len(windowed)) * 23  # every decode step after the prefill
    assert all(calls)


def test_ragged_kernel_switch_is_checked(monkeypatch):
    model = tiny_model("llama", kv_heads=2)
    sched = head_schedule(layer_heads(model))
    with pytest.raises(TypeError, match="ragged_kernel must be True or False"):
        with runtime.apply(model, sched, ragged_kernel="yes"):
            pass
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="runs on CUDA, the model is on cpu"):
        with runtime.apply(model, sched, ragged_kernel=True):
            pass
    monkeypatch.setitem(__import__("sys").modules, "triton", None)
    with pytest.raises(ValueError, match="needs Triton"):
        with runtime.apply(model, sched, ragged_kernel=True):
            pass
