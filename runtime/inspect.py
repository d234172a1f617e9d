"""Read-only views of a `PyramidCache`: what each layer keeps and how it would score its tokens.

Calibration, evaluation and the experiments read a cache through these functions only, never through its
attributes, so the cache's storage may change without breaking them. Layers whose KV heads keep different
shares hold one unit per KV head; functions that return per-unit data say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import AnyLayer, PyramidCache
from .schedule import Schedule


@dataclass(frozen=True)
class Kept:
    """The slots one unit (a layer, or one KV head of a split layer) holds."""

    keys: torch.Tensor  # [B, H, T, D]
    values: torch.Tensor  # [B, H, T, Dv]
    positions: torch.Tensor  # [B, H, T] original token positions
    valid: torch.Tensor  # [B, H, T] False for padding and unused slots


@dataclass(frozen=True)
class RecentQueries:
    """The newest queries a layer remembers to score its keys with at trim time."""

    queries: torch.Tensor  # [B, Hq, W, D]
    positions: torch.Tensor  # [B, W]
    valid: torch.Tensor  # [B, W]


def _layer(cache: PyramidCache, layer_idx: int) -> AnyLayer:
    if not isinstance(cache, PyramidCache):
        raise TypeError(f"expected a runtime PyramidCache, got {type(cache).__name__}")
    if not 0 <= layer_idx < len(cache.layers):
        raise IndexError(f"layer {layer_idx} is out of range: the cache has {len(cache.layers)} layers")
    cache.learn_validity()  # a padding token of the last decode step counts as soon as anything is read
    return cache.layers[layer_idx]


def kept(cache: PyramidCache, layer_idx: int) -> list[Kept]:
    """Per unit of layer `layer_idx`: its keys, values, positions and validity (one entry unless heads are split)."""
    return [Kept(u.keys, u.values, u.pos, u.valid) for u in _layer(cache, layer_idx).units()]


def kept_per_row(cache: PyramidCache, layer_idx: int) -> torch.Tensor:
    """[B] float: real tokens held per KV head of the layer, averaged over its heads (padding not counted)."""
    units = _layer(cache, layer_idx).units()
    return sum(u.valid.float().sum((-2, -1)) for u in units) / sum(u.valid.shape[1] for u in units)


def recent_queries(cache: PyramidCache, layer_idx: int) -> RecentQueries:
    """The layer's remembered recent queries (every query head)."""
    ring = _layer(cache, layer_idx).queries()
    if ring.q_buf is None:
        raise ValueError(f"layer {layer_idx} holds no queries yet: run a forward pass with the cache first")
    return RecentQueries(ring.q_buf, ring.q_buf_pos, ring.q_buf_valid)


def attention_scale(cache: PyramidCache, layer_idx: int) -> float:
    """The softmax scale the layer's attention used (seen at its first pass)."""
    scale = _layer(cache, layer_idx).units()[0].scaling
    if scale is None:
        raise ValueError(f"layer {layer_idx} has not attended yet: run a forward pass with the cache first")
    return float(scale)


def selection_scores(cache: PyramidCache, layer_idx: int, schedule: Schedule, queries: int | None = None):
    """[B, H, T]: the scores by which a rectangular layer would select its tokens under `schedule`'s selection
    settings, from its newest `queries` remembered queries (default: all it keeps)."""
    units = _layer(cache, layer_idx).units()
    if len(units) != 1:
        raise ValueError(f"layer {layer_idx} holds one unit per KV head; score each head's unit on its own")
    return units[0].scores(schedule, attention_scale(cache, layer_idx), queries=queries)
