"""Pure tensor functions that score cached tokens and choose the ones a layer keeps.

Shapes: B batch rows, H key/value heads, G query heads per KV head, W recent queries, T cached tokens, D head dim.
Nothing here reads a tensor back to the host, so the GPU path never synchronises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kept_counts(ratio: float, tokens: torch.Tensor, sinks: int, window: int, cap: int | None = None) -> torch.Tensor:
    """Per-row number of tokens to keep; the tensor twin of `schedule.kept_tokens` (same rounding)."""
    n = tokens.to(torch.float64)
    protected = torch.clamp(n, max=float(sinks + window))
    context = n - protected
    keep = protected + torch.minimum(context, torch.ceil(ratio * context - 1e-9))
    if cap is not None:
        keep = torch.clamp(keep, max=float(cap))
    return keep.to(torch.long)


def query_weights(num: int, kind: str, weight_max: float, device: torch.device) -> torch.Tensor:
    """Weights of the recent queries, oldest first: later queries predict the future better (PyramidInfer RAC)."""
    if kind == "linear" and num > 1:
        return torch.linspace(1.0, weight_max, num, device=device, dtype=torch.float32)
    return torch.ones(num, device=device, dtype=torch.float32)


def recent_attention(
    queries: torch.Tensor,  # [B, H*G, W, D]
    q_pos: torch.Tensor,  # [B, W]
    q_valid: torch.Tensor,  # [B, W]
    keys: torch.Tensor,  # [B, H, T, D]
    k_pos: torch.Tensor,  # [B, H, T]
    k_valid: torch.Tensor,  # [B, H, T]
    scaling: float,
    weights: torch.Tensor,  # [W]
    all_valid: bool = False,  # a python promise that every query and key is valid: skips the empty-row guard
) -> torch.Tensor:
    """Weighted mean attention probability that the recent queries give each cached key: [B, H, T].

    Only the W recent queries are multiplied with the keys (a W x T product), never the full T x T matrix.
    """
    b, hq, w, d = queries.shape
    h = keys.shape[1]
    g = hq // h
    q = queries.reshape(b, h, g * w, d)
    logits = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling  # [B, H, G*W, T]
    logits = logits.view(b, h, g, w, -1)
    visible = k_valid[:, :, None, None, :] & (k_pos[:, :, None, None, :] <= q_pos[:, None, None, :, None])
    probs = torch.softmax(logits.masked_fill_(~visible, float("-inf")), dim=-1)
    if not all_valid:  # a padded query may see nothing (NaN); a valid one always sees its own key
        probs = probs.nan_to_num_(0.0)
    wq = weights[None, :] * q_valid.to(weights.dtype)  # [B, W]
    wq = wq / wq.sum(-1, keepdim=True).clamp_min(1e-6)
    return torch.einsum("bhgwt,bw->bht", probs, wq) / g


def pool(scores: torch.Tensor, valid: torch.Tensor | None, kind: str, kernel: int) -> torch.Tensor:
    """Smooth scores over neighbouring tokens, so that a fact spread over adjacent tokens survives together.

    Neighbours are the adjacent *valid* tokens: invalid slots (padding, tokens a padded row does not keep) are
    moved out of the way first, so a row pools the same alone or in a batch.
    """
    if kind == "none" or kernel <= 1:
        return scores
    if valid is None:  # every slot valid: neighbours are simply adjacent slots
        flat = scores.reshape(-1, 1, scores.shape[-1])
        pad = kernel // 2
        if kind == "max":
            return F.max_pool1d(flat, kernel, stride=1, padding=pad).reshape(scores.shape)
        return F.avg_pool1d(flat, kernel, stride=1, padding=pad, count_include_pad=False).reshape(scores.shape)
    valid = valid.expand_as(scores)
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices  # valid slots first, in order
    s = torch.gather(scores, -1, order).reshape(-1, 1, scores.shape[-1])
    v = torch.gather(valid, -1, order).reshape(-1, 1, scores.shape[-1]).to(s.dtype)
    pad = kernel // 2
    if kind == "max":
        pooled = F.max_pool1d(s.masked_fill(v == 0, float("-inf")), kernel, stride=1, padding=pad)
    else:
        pooled = F.avg_pool1d(s * v, kernel, stride=1, padding=pad) / F.avg_pool1d(v, kernel, stride=1, padding=pad)
    return torch.empty_like(scores).scatter_(-1, order, pooled.reshape(scores.shape))


def protected_mask(valid: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Sinks (the first valid tokens) and the recent window (the last valid tokens): always kept.

    Slots are in chronological order, so a token's rank among the valid slots tells whether it is a sink or recent.
    """
    ordinal = torch.cumsum(valid.to(torch.long), dim=-1) - 1
    total = ordinal[..., -1:] + 1
    return valid & ((ordinal < sinks) | (ordinal >= total - window))


def choose(
    scores: torch.Tensor,  # [B, H', T] with H' = 1 (shared by heads) or H
    valid: torch.Tensor,  # [B, H', T]
    protect: torch.Tensor,  # [B, H', T]
    keep: torch.Tensor,  # [B] tokens to keep per row, or [B, H'] per row and head
    k_max: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (chronological) of the k_max best slots per row and head, and which of them are really kept.

    Rows (or heads) that keep fewer than k_max tokens mark their surplus slots invalid, so a batch stays
    rectangular while every row and head keeps exactly its own count.
    """
    ranked = scores.float().masked_fill(protect, float("inf")).masked_fill(~valid, float("-inf"))
    k_max = min(k_max, ranked.shape[-1])
    # pooled scores tie often; a stable sort breaks ties by age, so a row decides the same alone or padded
    top, idx = torch.sort(ranked, dim=-1, descending=True, stable=True)
    top, idx = top[..., :k_max], idx[..., :k_max]
    rank = torch.arange(k_max, device=idx.device)
    kept = (rank[None, None, :] < keep.view(keep.shape[0], -1, 1)) & (top > float("-inf"))
    idx, order = torch.sort(idx, dim=-1)
    return idx, torch.gather(kept, -1, order)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather along the token axis: x [B, H, T, ...] with idx [B, H or 1, K] -> [B, H, K, ...]."""
    if idx.shape[1] != x.shape[1]:
        idx = idx.expand(-1, x.shape[1], -1)
    if x.dim() == 3:
        return torch.gather(x, 2, idx)
    return torch.gather(x, 2, idx[..., None].expand(*idx.shape, x.shape[-1]))
