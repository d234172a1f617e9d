"""Views of a `Profile`: recall heat map and decay across depth, single-layer sensitivity curves, per kind."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .display import _heat, _styled, _tab, figure


def _depth_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)], cmap


@_styled
def recall_heatmap(profile) -> Any:
    """Layer x retention ratio heat map of the recall curves: the share of future attention kept when the recent
    window's attention picks `ratio` of the context. Layers the runtime never compresses are blank."""
    grid = list(profile.grid)
    rows = [
        [float(v) for v in profile.recall[layer].tolist()] if profile.compressible[layer] else [math.nan] * len(grid)
        for layer in range(profile.num_layers)
    ]
    fig, ax = figure(1.1 * len(grid) + 2.2, 0.19 * len(rows) + 1.4)
    image = _heat(ax, rows, "{:.2f}", lambda v: "white" if v < 0.6 else "black", vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(grid)), [f"{g:g}" for g in grid])
    ax.set_xlabel("retention ratio (share of the context kept)")
    ax.set_title("recall: future attention kept by the recent window's choice", fontsize=9)
    fig.colorbar(image, ax=ax, label="recall", shrink=0.8)
    return fig


def _decay(fit: Mapping[str, float], x: float) -> float:
    return fit["a"] * math.exp(-fit["b"] * x) + fit["c"]


@_styled
def recall_decay(profile, levels: Sequence[float] = (0.9, 0.95), schedule=None) -> Any:
    """Per-layer ratio needed to keep 90% / 95% of the future attention across depth, with the fitted decay
    r(l) = a exp(-b l/L) + c (PyramidInfer's observation: deeper layers need less); optionally the schedule's
    ratios for comparison."""
    fig, ax = figure(7.5, 3.6)
    n = profile.num_layers
    layers = [i for i in range(n) if profile.compressible[i]]
    colors = ["tab:blue", "tab:red", "tab:green", "tab:orange"]
    for color, level in zip(colors, levels):
        need = profile.ratio_for_recall(level)
        ax.plot(layers, [need[i] for i in layers], "o-", color=color, ms=3.5, lw=1, label=f"ratio for {level:.0%}")
        fit = profile.decay_fit(level)
        if fit:
            xs = [i / 10 for i in range(0, 10 * (n - 1) + 1)]
            ys = [_decay(fit, x / n) for x in xs]
            label = f"fit {fit['a']:.2f}·exp(-{fit['b']:.2f}·l/L) + {fit['c']:.2f} (R² {fit['r2']:.2f})"
            ax.plot(xs, ys, "--", color=color, lw=1.2, label=label)
    if schedule is not None:
        ax.step(range(n), schedule.ratios, where="mid", color="tab:green", lw=1.2, alpha=0.7, label="schedule")
    ax.set_xlabel("layer")
    ax.set_ylabel("retention ratio")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("ratio needed to keep future attention, across depth", fontsize=9)
    return fig


@_styled
def sensitivity_curves(profile, floor: float = 1e-6) -> Any:
    """Left: KL against the full cache when only one layer is compressed, against the ratio (a line per layer,
    coloured by depth). Right: the same across depth, a line per ratio. Log scale (values clipped at `floor`)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import NullFormatter

    fig, (left, right) = figure(11, 3.8, ncols=2)
    grid = list(profile.grid)
    n = profile.num_layers
    colors, cmap = _depth_colors(n)
    sens = [[max(float(v), floor) for v in profile.sensitivity[i].tolist()] for i in range(n)]
    for i in range(n):
        if profile.compressible[i]:
            left.plot(grid, sens[i], "-", marker=".", ms=3, lw=1, color=colors[i])
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xticks(grid, [f"{g:g}" for g in grid], fontsize=7)
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("retention ratio of that layer (others keep everything)")
    left.set_ylabel("KL(full || compressed), nats/token")
    left.set_title("single-layer sensitivity", fontsize=9)
    left.grid(alpha=0.3)

    fig.colorbar(ScalarMappable(Normalize(0, n - 1), cmap), ax=left, label="layer", shrink=0.8)
    layers = [i for i in range(n) if profile.compressible[i]]
    ratio_colors, _ = _depth_colors(len(grid))
    for g, (ratio, color) in enumerate(zip(grid, ratio_colors)):
        right.plot(layers, [sens[i][g] for i in layers], "o-", ms=3, lw=1, color=color, label=f"ratio {ratio:g}")
    right.set_yscale("log")
    right.set_xlabel("layer")
    right.set_ylabel("KL(full || compressed), nats/token")
    right.set_title("which layers the output depends on", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    return fig


@_styled
def sensitivity_by_kind(profile, ratio: float = 0.1, floor: float = 1e-6) -> Any:
    """Single-layer KL per kind of example (natural text, retrieval tasks) across depth at the grid ratio nearest
    `ratio`. Left: in nats, log scale. Right: each kind divided by its own mean over the compressible layers and
    the grid, and their average: the curves the allocation water-fills (`calibrate.allocate.equal_weight`; the
    search may also reshape them with an exponent or blend towards uniform), at that one ratio. None for a
    profile saved without per-kind curves."""
    from ..allocate import equal_weight

    if profile.parts is None:
        return None
    grid = list(profile.grid)
    g = min(range(len(grid)), key=lambda j: abs(grid[j] - ratio))
    layers = [i for i in range(profile.num_layers) if profile.compressible[i]]
    parts = profile.parts.tolist()
    fig, (left, right) = figure(11, 3.6, ncols=2)
    for k, (name, part) in enumerate(zip(profile.part_names, parts, strict=True)):
        relative = equal_weight([part], profile.compressible)  # one kind alone: divided by its own mean
        left.plot(layers, [max(part[i][g], floor) for i in layers], "o-", ms=3, lw=1, color=_tab(k), label=name)
        right.plot(layers, [max(relative[i][g], floor) for i in layers], "o-", ms=3, lw=1, color=_tab(k), alpha=0.6)
    weighted = profile.allocation_curves()
    right.plot(layers, [max(weighted[i][g], floor) for i in layers], "k-", lw=1.8, label="allocation (equal weight)")
    left.set_yscale("log")
    left.set_ylabel("KL(full || compressed), nats/token")
    left.set_title(f"single-layer sensitivity per kind at ratio {grid[g]:g}", fontsize=9)
    right.set_yscale("log")
    right.set_ylabel("KL / that kind's mean (compressible layers, all ratios)")
    right.set_title("what the allocation sees: each kind counts equally", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig
