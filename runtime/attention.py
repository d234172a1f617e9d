"""The attention function registered with transformers: stock SDPA (or eager) with each layer's own mask.

transformers builds one mask per forward pass, sized for the first layer; under a pyramid schedule every layer
holds a different number of tokens, so each layer builds its mask from its own slots instead.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from .ragged_decode import ragged_decode

SDPA = "pyramid_sdpa"
EAGER = "pyramid_eager"


def _no_mask(*args, **kwargs) -> None:
    return None  # layers build their own masks from the cache


def _eager(module, query, key, value, mask, is_causal=None, **kwargs):
    if mask is None and query.shape[2] > 1:  # SDPA's is_causal fast path, spelled out for eager
        q, t = query.shape[2], key.shape[2]
        mask = torch.ones(q, t, dtype=torch.bool, device=query.device).tril(t - q)[None, None]
    if mask is not None:  # eager adds a float mask
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
    return eager_attention_forward(module, query, key, value, mask, **kwargs)


def _kernel_applies(step, parts, query, kwargs) -> bool:
    """The one-launch kernel does what the per-head loop does only for one decode token in a layer known to hold no
    padding slots, over heads whose sliding window (if any) still spans every slot, with no logit soft-capping or
    dropout. A decode token that is itself padding may run it (its padding is learnt at the next pass): that row's
    output is never read, and its slot is masked from the next step on."""
    return (
        query.shape[2] == 1
        and not step.has_invalid
        and not any(unit.window_overflows(step) for unit, _ in parts)
        and kwargs.get("softcap") is None
        and not kwargs.get("dropout")
    )


def decode_packed(query, key, value, mask, scaling: float) -> torch.Tensor:
    """SDPA of one decode token per row with each KV head's query group packed as its query rows: query [B, Hq, 1,
    D] as [B, Hkv, G, D] against key/value [B, Hkv, T, D], mask None or [B, 1 or Hq, 1, T]. Returns [B, 1, Hq, D]
    as the attention functions do. It is what transformers' SDPA does for one token under a mask (`pack_gqa`);
    with no mask it would take `enable_gqa` instead, which the CPU kernel runs slower, and the runtime's layers
    mostly need no mask in decode (`experiments.interleaved_steps --ones` measures the whole step against stock)."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d)
    if mask is not None and mask.shape[1] != 1:
        mask = mask.reshape(b, hkv, hq // hkv, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, 1, hq, d)


def _packs(base, query, key, kwargs) -> bool:
    """Whether `decode_packed` does what `base` would: stock SDPA, one token, whole query groups over several query
    heads per KV head, and nothing it leaves out (dropout, soft-capping, a position bias)."""
    return (
        base is sdpa_attention_forward
        and query.shape[2] == 1
        and query.shape[1] > key.shape[1]
        and query.shape[1] % key.shape[1] == 0
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
    )


def _make(base):
    def attend(module, q, k, v, mask, scaling, kwargs):
        if _packs(base, q, k, kwargs):
            return decode_packed(q, k, v, mask, scaling), None
        return base(module, q, k, v, mask, scaling=scaling, is_causal=mask is None, **kwargs)

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        found = kwargs.pop("pyramid", None)
        kwargs.pop("sliding_window", None)  # the layer's mask already limits the window
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if found is None:  # no cache in this call: plain causal attention
            return base(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        cache, layer_idx = found
        parts = cache.layers[layer_idx].parts(query)
        if len(parts) > 1 and cache.ragged_kernel and _kernel_applies(cache.step, parts, query, kwargs):
            units = [unit for unit, _ in parts]
            table, lengths = cache.layers[layer_idx].kernel_inputs()
            out = ragged_decode(
                query, [u.keys for u in units], [u.values for u in units], [u.valid for u in units], scaling,
                has_invalid=any(u.has_invalid for u in units), table=table, lengths=lengths,
            )  # fmt: skip
            cache.after_attention(layer_idx, query, scaling)
            return out, None
        outs = []
        # one part for a plain layer; one per KV head (with its query group) where heads keep different shares
        for unit, q in parts:
            mask = unit.attention_mask(cache.step, q.shape[1])
            outs.append(attend(module, q, unit.keys, unit.values, mask, scaling, kwargs))
        cache.after_attention(layer_idx, query, scaling)
        if len(outs) == 1:
            return outs[0]
        return torch.cat([o for o, _ in outs], dim=2), None  # [B, q, Hq, D]; heads' weights differ in length

    return attention


def register() -> None:
    """Make the two implementations known to transformers (idempotent)."""
    AttentionInterface.register(SDPA, _make(sdpa_attention_forward))
    AttentionInterface.register(EAGER, _make(_eager))
    AttentionMaskInterface.register(SDPA, _no_mask)
    AttentionMaskInterface.register(EAGER, _no_mask)
