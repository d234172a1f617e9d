"""What cheaper per-head curves would cost the allocation, scored offline on a profile that has full ones.

    python -m experiments.head_curve_shortcuts [--profile schedules/smollm2-135m-instruct] [--out FILE]

Each shortcut rebuilds the per-head curves from less measurement, water-fills the budget over them, and is scored
by the loss the additive model predicts from the *measured* curves (the sum of single-head KLs at the allocated
shares, kinds weighed as the allocation weighs them), relative to the allocation from the measured curves:

- `scaled S`: head curves measured only at the grid points S; elsewhere the layer's curve times the head/layer
  ratio interpolated between those points (saves 1 - |S| / |grid| of the head curves);
- `flat tau`: no head curves for layers whose weighted KL at the grid's floor is below tau x the mean (each head
  then gets the layer's curve / heads);
- `per layer`: no head curves at all (every head of a layer keeps the layer's share).

This is a screen, not a result: a shortcut worth adopting still has to keep the held-out KL (`paired_kl`).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from calibrate.allocate import equal_weight, mean_ratio_at, water_fill, water_fill_heads
from calibrate.head_curves import from_layer_shape
from calibrate.profiling import Profile
from runtime.schedule import group_heads, heads_compressible, write_atomic

from . import check_out

BUDGETS = (0.2, 0.3, 0.5)


def weighted(profile: Profile, head_parts: torch.Tensor) -> list[list[list[float]]]:
    """[L][H][G] curves as the allocation weighs them (each kind by its own mean)."""
    k, layers, heads, g = head_parts.shape
    units = head_parts.reshape(k, layers * heads, g).tolist()
    return group_heads(equal_weight(units, heads_compressible(profile.compressible, heads)), heads)


def interpolate(grid: list[float], curve: list[float], r: float) -> float:
    """Piecewise linear in the grid, flat below its first point, 0 at ratio 1."""
    xs, ys = [*grid, 1.0], [*curve, 0.0]
    if r <= xs[0]:
        return ys[0]
    for (x1, y1), (x2, y2) in itertools.pairwise(zip(xs, ys, strict=True)):
        if r <= x2:
            return y1 + (y2 - y1) * (r - x1) / (x2 - x1)
    return 0.0


def scaled(profile: Profile, points: list[int]) -> torch.Tensor:
    """Head curves from the layer curve times the head/layer ratio at `points`, interpolated in between."""
    return from_layer_shape(profile.parts, profile.head_parts[..., points], profile.grid, points)


def flat(profile: Profile, tau: float) -> tuple[torch.Tensor, int]:
    heads = profile.head_parts.shape[2]
    curves = equal_weight(profile.parts.tolist(), profile.compressible)
    comp = [i for i, c in enumerate(profile.compressible) if c]
    floor = sum(curves[i][0] for i in comp) / len(comp)
    skipped = [i for i in comp if curves[i][0] < tau * floor]
    out = profile.head_parts.clone()
    for i in skipped:
        out[:, i] = profile.parts[:, i, None, :] / heads
    return out, len(skipped)


class Screen:
    """Scores allocations by the loss the profile's *measured* head curves predict (the sum of single-head KLs at
    the allocated shares), relative to the allocation water-filled from those curves, at each of BUDGETS."""

    def __init__(self, profile: Profile, context_length: int, protected: int):
        self.grid, self.comp = profile.grid, profile.compressible
        self.heads = profile.head_parts.shape[2]
        self.true = weighted(profile, profile.head_parts)
        self.means = {b: mean_ratio_at(b, context_length, protected) for b in BUDGETS}
        self.exact = {b: self.loss(water_fill_heads(self.true, self.grid, m, self.comp)) for b, m in self.means.items()}

    def loss(self, shares: list[list[float]]) -> float:
        return sum(
            interpolate(self.grid, self.true[i][h], shares[i][h])
            for i in range(len(self.comp))
            if self.comp[i]
            for h in range(self.heads)
        )

    def relative(self, shares_of) -> dict[str, float]:
        """{"b0.3": loss of `shares_of(mean ratio)` / the measured curves' own loss, ...} over BUDGETS."""
        return {f"b{b:g}": self.loss(shares_of(m)) / self.exact[b] for b, m in self.means.items()}

    def of_curves(self, curves: list[list[list[float]]]) -> dict[str, float]:
        """`relative` for the per-head water-fill over `curves` (weighted [L][H][G] curves)."""
        return self.relative(lambda m: water_fill_heads(curves, self.grid, m, self.comp))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="schedules/smollm2-135m-instruct", help="profile stem with head curves")
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--protected", type=int, default=36, help="sinks + window (default 4 + 32)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    check_out(args.out)
    prof = Profile.load(args.profile)
    if prof.head_parts is None:
        raise SystemExit(f"error: --profile {args.profile} has no per-head curves; profile without --no-per-head")
    grid, comp = prof.grid, prof.compressible
    heads = prof.head_parts.shape[2]
    screen = Screen(prof, args.context_length, args.protected)
    rows: list[dict] = []

    def add(name: str, saved: float, scores: dict[str, float]) -> None:
        rows.append({"shortcut": name, "head_curves_saved": round(saved, 3), **scores})

    layer_curves = equal_weight(prof.parts.tolist(), comp)
    add("per layer", 1.0, screen.relative(lambda m: [[r] * heads for r in water_fill(layer_curves, grid, m, comp)]))
    for n in (2, 3, 4):
        for points in itertools.combinations(range(len(grid)), n):
            curves = weighted(prof, scaled(prof, list(points)))
            add(f"scaled {[grid[g] for g in points]}", 1 - n / len(grid), screen.of_curves(curves))
    for tau in (0.02, 0.05, 0.1):
        parts, skipped = flat(prof, tau)
        add(f"flat {tau} ({skipped} layers)", skipped / sum(comp), screen.of_curves(weighted(prof, parts)))
    print("| shortcut | head curves saved | " + " | ".join(f"loss at {b:g}" for b in BUDGETS) + " |")
    print("|---|---|" + "---|" * len(BUDGETS))
    for r in rows:
        cells = " | ".join(f"{r[f'b{b:g}']:.3f}x" for b in BUDGETS)
        print(f"| {r['shortcut']} | {r['head_curves_saved']:.0%} | {cells} |")
    if args.out:
        result = {"profile": args.profile, "exact_loss": screen.exact, "rows": rows}
        write_atomic(args.out, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
