"""One attention call per decode step for a layer whose KV heads keep different numbers of tokens.

A `RaggedLayer` keeps every KV head in its own buffer, so the plain path runs SDPA once per KV head (plus slicing
and a concatenation): on a GPU that is many tiny launches per layer and step. This is one split-K Triton kernel
over all of a layer's heads: program (row, KV head, split) attends that head's group of queries to its split of
that head's slots with an online softmax, and the splits are merged by their log-sum-exp. The heads' buffers stay
where they are: a small table on the device holds each one's address and strides, and a vector its length; a
flat `RaggedLayer` keeps both on the device between steps.

Triton is imported on first use only. The kernel runs on CUDA, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, how the tests check it against the per-head SDPA path it replaces).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

BLOCK_N = 64  # slots per inner tile
CHUNK = 512  # slots per split: a program's share of one head's tokens


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def split_attention(
        q_ptr, table_ptr, lengths_ptr, m_ptr, l_ptr, acc_ptr, scale, splits,
        stride_qb, stride_qh,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK: tl.constexpr, CHUNK_: tl.constexpr, HAS_INVALID: tl.constexpr, F32_DOT: tl.constexpr,
    ):  # fmt: skip
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        heads = tl.num_programs(1)
        row = table_ptr + h * 9
        dtype = q_ptr.dtype.element_ty
        k_ptr = tl.load(row).to(tl.pointer_type(dtype))
        v_ptr = tl.load(row + 1).to(tl.pointer_type(dtype))
        valid_ptr = tl.load(row + 2).to(tl.pointer_type(tl.int8))
        n = tl.load(lengths_ptr + h)
        k_b, k_s = tl.load(row + 3), tl.load(row + 4)
        v_b, v_s = tl.load(row + 5), tl.load(row + 6)
        ok_b, ok_s = tl.load(row + 7), tl.load(row + 8)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        q_mask = (g < GROUP)[:, None] & (d < D)[None, :]
        q = tl.load(q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        start = s * CHUNK_
        end = tl.minimum(start + CHUNK_, n)
        for first in range(start, end, BLOCK):
            slots = first + tl.arange(0, BLOCK)
            inside = slots < end
            kv_mask = inside[:, None] & (d < D)[None, :]
            k = tl.load(k_ptr + b * k_b + slots[:, None] * k_s + d[None, :], mask=kv_mask, other=0.0)
            if F32_DOT:
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            keep = inside
            if HAS_INVALID:
                keep = keep & (tl.load(valid_ptr + b * ok_b + slots * ok_s, mask=inside, other=0) != 0)
            scores = tl.where(keep[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with nothing to see adds nothing
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * v_b + slots[:, None] * v_s + d[None, :], mask=kv_mask, other=0.0)
            if F32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v)
            m_i = m_new
        unit = (b * heads + h) * splits + s
        tl.store(m_ptr + unit * BLOCK_G + g, m_i)
        tl.store(l_ptr + unit * BLOCK_G + g, l_i)
        tl.store(acc_ptr + (unit * BLOCK_G + g)[:, None] * BLOCK_D + d[None, :], acc)

    return split_attention


def unavailable(device: torch.device) -> str | None:
    """Why the kernel cannot run for tensors on `device`, or None when it can (Triton on CUDA, or its CPU
    interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs Triton (torch's CUDA wheels bring it; or pip install triton)"
    if device.type != "cuda" and not _interpreted():
        return (
            f"runs on CUDA, the model is on {device}; leave it off there (the per-head path is the CPU one), or set "
            f"TRITON_INTERPRET=1 to check the kernel on CPU"
        )
    return None


def _interpreted() -> bool:
    # the interpreter's bfloat16 tl.dot is wrong (triton 3.9: errors of 1e10 on a 16x16 product); in float32 it is
    # right, so there the kernel computes in float32 whatever the dtype, and only the compiled bf16 MMA goes untested
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


def head_table(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], valid: Sequence[torch.Tensor]
) -> torch.Tensor:
    """[H, 9] int64 on the heads' device: each head's key, value and validity addresses and the batch and slot
    strides of the three (keys/values [B, 1, n, D] with unit stride along D, valid [B, 1, n]). The lengths go
    apart (`ragged_decode`'s `lengths`), so a caller whose buffers stay put keeps one table for many steps."""
    rows = []
    for k, v, ok in zip(keys, values, valid, strict=True):
        if k.stride(-1) != 1 or v.stride(-1) != 1 or ok.dtype != torch.bool:
            raise ValueError("ragged_decode needs keys and values contiguous along the head dimension, bool valid")
        rows.append([k.data_ptr(), v.data_ptr(), ok.data_ptr(),
                     k.stride(0), k.stride(2), v.stride(0), v.stride(2), ok.stride(0), ok.stride(2)])  # fmt: skip
    return torch.tensor(rows, dtype=torch.int64, device=keys[0].device)


def ragged_decode(
    query: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    valid: Sequence[torch.Tensor],
    scaling: float,
    has_invalid: bool,
    table: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one decode token per row over KV heads of different lengths, in one kernel launch.

    query [B, Hq, 1, D]; per KV head h: keys[h], values[h] [B, 1, n_h, D], valid[h] [B, 1, n_h] (read only when
    `has_invalid`). KV head h serves query heads h*G..(h+1)*G-1. Returns [B, 1, Hq, D], as the attention
    functions do. `table` (`head_table` of the heads' buffers) and `lengths` [H] (int64, each n_h) may come from
    a caller that keeps them on the device (a flat `RaggedLayer`): then nothing is copied to the device per call.
    """
    b, hq, q_len, dim = query.shape
    heads = len(keys)
    if q_len != 1 or hq % heads:
        raise ValueError(f"ragged_decode takes one query token and whole query groups, got {tuple(query.shape)}")
    group = hq // heads
    block_g, block_d = _pow2(group), _pow2(dim)
    splits = max(1, -(-max(k.shape[2] for k in keys) // CHUNK))
    q = query[:, :, 0]
    m = torch.empty(b, heads, splits, block_g, device=query.device, dtype=torch.float32)
    lse = torch.empty_like(m)
    acc = torch.empty(b, heads, splits, block_g, block_d, device=query.device, dtype=torch.float32)
    if table is None:
        table = head_table(keys, values, valid)
    if lengths is None:
        lengths = torch.tensor([k.shape[2] for k in keys], dtype=torch.int64, device=query.device)
    _kernel()[(b, heads, splits)](
        q, table, lengths, m, lse, acc, scaling, splits, q.stride(0), q.stride(1),
        GROUP=group, BLOCK_G=block_g, D=dim, BLOCK_D=block_d, BLOCK=BLOCK_N, CHUNK_=CHUNK,
        HAS_INVALID=has_invalid, F32_DOT=query.dtype == torch.float32 or _interpreted(),
    )  # fmt: skip
    return merge_splits(m, lse, acc)[:, :, :group, :dim].reshape(b, 1, hq, dim).to(query.dtype)


def merge_splits(m: torch.Tensor, total: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Combine per-split online-softmax states: max and sum of exp [B, H, S, G], weighted values [B, H, S, G, D]."""
    top = m.amax(2, keepdim=True)
    w = torch.exp(m - top)  # an empty split (max -inf) weighs 0
    return (w[..., None] * acc).sum(2) / (w * total).sum(2)[..., None]
