"""Distribute a retention budget over layers from measured per-layer sensitivity curves (pure functions).

`curves[l][g]` is the output KL when only layer l keeps `grid[g]` of its context. Minimising the sum of those
KLs under a fixed mean ratio is a separable resource-allocation problem: on the lower convex hull of each curve,
spending ratio where the KL falls fastest per unit ratio is optimal (water-filling on marginal KL reduction).
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.schedule import group_heads, heads_compressible


def convex_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of (ratio, kl) points sorted by ratio."""
    hull: list[tuple[float, float]] = []
    for p in sorted(points):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()  # hull[-1] lies on or above the chord: not on the lower hull
            else:
                break
        hull.append(p)
    return hull


def mean_ratio_at(budget: float, context_length: int, protected: int) -> float:
    """The mean ratio of the droppable context that keeps a KV fraction of `budget` when `protected` tokens
    (sinks and recent window) are always kept; rounding aside, which a final rescale to the budget settles."""
    n = context_length
    return max(1e-3, min(1.0, (budget * n - protected) / max(n - protected, 1)))


def water_fill(
    curves: Sequence[Sequence[float]],
    grid: Sequence[float],
    mean_ratio: float,
    compressible: Sequence[bool] | None = None,
    exponent: float = 1.0,
) -> list[float]:
    """Per-layer ratios with the given mean over compressible layers that minimise the summed curve values.

    The curves are taken to reach 0 at ratio 1. `exponent` reshapes them (KL ** exponent) before allocating, a
    knob the search uses to correct for layers whose errors do not simply add up.
    """
    n = len(curves)
    compressible = list(compressible) if compressible is not None else [True] * n
    idx = [i for i in range(n) if compressible[i]]
    lo = min(grid)
    ratios = [1.0] * n
    if not idx:
        return ratios
    target = mean_ratio * len(idx)
    if target <= lo * len(idx):
        for i in idx:
            ratios[i] = lo
        return ratios
    segments = []  # (slope, layer, start, end): slope = KL gained per unit of ratio, most negative first
    for i in idx:
        pts = [(float(g), max(float(v), 0.0) ** exponent) for g, v in zip(grid, curves[i], strict=True)]
        pts.append((1.0, 0.0))
        hull = convex_hull(pts)
        for (x1, y1), (x2, y2) in zip(hull, hull[1:], strict=False):
            segments.append(((y2 - y1) / (x2 - x1), i, x1, x2))
        ratios[i] = hull[0][0]
    spend = target - sum(ratios[i] for i in idx)
    # hull slopes rise along each layer, so taking segments by slope keeps every layer's segments in order
    for slope, i, x1, x2 in sorted(segments, key=lambda s: (s[0], s[1], s[2])):
        if spend <= 0:
            break
        if slope >= 0:
            break  # nothing left to gain; the rest is spread below
        step = min(x2 - x1, spend)
        ratios[i] = x1 + step
        spend -= step
    if spend > 1e-12:  # every curve is flat from here: spread what remains evenly
        for i in idx:
            add = min(1.0 - ratios[i], spend / len(idx))
            ratios[i] += add
    return ratios


def water_fill_heads(
    curves: Sequence[Sequence[Sequence[float]]],
    grid: Sequence[float],
    mean_ratio: float,
    compressible: Sequence[bool],
    exponent: float = 1.0,
) -> list[list[float]]:
    """`water_fill` over every KV head of every layer (`curves[l][h][g]`): [L][H] shares with the given mean."""
    heads = len(curves[0])
    units = [c for row in curves for c in row]
    flat = water_fill(units, grid, mean_ratio, heads_compressible(compressible, heads), exponent=exponent)
    return group_heads(flat, heads)


def equal_weight(parts: Sequence[Sequence[Sequence[float]]], compressible: Sequence[bool]) -> list[list[float]]:
    """Average per-kind curves (`parts[k][l][g]`) after dividing each kind by its own mean over compressible layers.

    Retrieval tasks lose nats by the dozen where a needle is dropped, while natural text loses hundredths; a plain
    mean of KLs is then decided by the tasks alone, and text-only layers starve. Weighing every kind by its
    relative loss makes each count equally, whatever its scale (water-filling ignores the overall scale).
    """
    layers = [i for i, c in enumerate(compressible) if c]
    out = [[0.0] * len(row) for row in parts[0]]
    for part in parts:
        scale = sum(sum(part[i]) for i in layers) / max(sum(len(part[i]) for i in layers), 1)
        if scale <= 0:
            continue  # a kind that no compression hurts has nothing to say about the allocation
        for i, row in enumerate(part):
            for g, v in enumerate(row):
                out[i][g] += v / scale / len(parts)
    return out


def blend(a: Sequence[float], b: Sequence[float], weight: float) -> list[float]:
    """(1 - weight) * a + weight * b, element-wise."""
    return [(1 - weight) * x + weight * y for x, y in zip(a, b, strict=True)]
