"""Per-head curves from fewer measurements: each head measured at some grid points, the rest from its layer's curve.

A head's sensitivity curve has its layer's shape more than its own level: the layer curve (measured at every grid
point anyway) times the head/layer ratio, interpolated linearly between the points where the head was measured,
stands in for the head at the points it was not. Screened offline (`experiments.head_curve_shortcuts`) and checked
on held-out text (`experiments.head_points`, then `paired_kl`): fewer points cost more KL than a default may, so
`calibrate run` measures every point unless `--head-points` says otherwise (docs/method.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_points(points: Sequence[float], grid: Sequence[float]) -> list[int]:
    """Indices in `grid` of `points` (grid ratios); a clear error naming the ratios that are not in it."""
    missing = [p for p in points if not any(abs(p - g) < 1e-9 for g in grid)]
    if missing or not points:
        raise ValueError(
            f"head grid points {list(points)} must be a non-empty subset of the profile grid {list(grid)}"
            + (f"; {missing} are not in it" if missing else "")
        )
    return sorted({min(range(len(grid)), key=lambda i: abs(grid[i] - p)) for p in points})


def from_layer_shape(layer: torch.Tensor, measured: torch.Tensor, grid: Sequence[float], points: Sequence[int]):
    """[K, L, H, G] head curves from `measured` [K, L, H, S] (heads at grid indices `points`, S of them) and the
    layer curves `layer` [K, L, G]: measured values where measured, elsewhere the layer's value times the
    head/layer ratio interpolated linearly in the ratio between the nearest measured points (held flat beyond
    the first and last). With every grid point measured it returns `measured` itself."""
    points = list(points)
    ratio = measured / layer[:, :, None, points].clamp_min(1e-12)  # [K, L, H, S]
    xs = [grid[g] for g in points]
    out = torch.empty(*measured.shape[:3], len(grid), dtype=measured.dtype)
    for g, r in enumerate(grid):
        if g in points:
            out[..., g] = measured[..., points.index(g)]
            continue
        right = next((i for i, x in enumerate(xs) if x > r), len(xs))
        if right == 0:
            s = ratio[..., 0]
        elif right == len(xs):
            s = ratio[..., -1]
        else:
            t = (r - xs[right - 1]) / (xs[right] - xs[right - 1])
            s = ratio[..., right - 1] + t * (ratio[..., right] - ratio[..., right - 1])
        out[..., g] = layer[..., g, None] * s
    return out


def from_shares(layer: torch.Tensor, head_estimate: torch.Tensor, layer_estimate: torch.Tensor) -> torch.Tensor:
    """[K, L, H, G] head curves: the measured layer curves `layer` [K, L, G], each head taking the share of them
    that an estimate gives it, `head_estimate` [K, L, H, G] over `layer_estimate` [K, L, G] (the same estimate
    for the whole layer, e.g. `head_fisher.fisher_kl`). Where the estimate is 0 (nothing changed) so is the head."""
    return layer[:, :, None, :] * head_shares(head_estimate, layer_estimate)


def head_shares(head_estimate: torch.Tensor, layer_estimate: torch.Tensor) -> torch.Tensor:
    """[K, L, H, G]: each head's estimate over its layer's, [K, L, H, G] over [K, L, G] (0 where both are)."""
    return head_estimate / layer_estimate[:, :, None, :].clamp_min(1e-30)
