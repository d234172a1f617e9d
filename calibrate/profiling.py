"""Per-layer measurements that calibration rests on, saved as safetensors plus a JSON summary.

- Recent attention consistency (PyramidInfer's RAC): the share of the attention that future tokens put on the
  context keys that the recent window's attention would keep, at a grid of retention ratios (recall curves), the
  overlap of the two top sets, and how recall changes with the size of the recent window.
- Output sensitivity: the KL against the full cache when only one layer is compressed, at the same grid, per kind
  of example (natural text, retrieval tasks). This is the signal the allocation uses: attention recall is a poor
  proxy for what the output needs.
- Per-head sensitivity (models with several KV heads): the same when only one KV head of one layer is
  compressed. Within a layer the heads matter very differently, so shares per head spend memory where it counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from safetensors.torch import load_file

import runtime
import runtime.inspect
from runtime.schedule import Schedule, Selection, group_heads, heads_compressible, write_atomic

from . import unit_pool
from .allocate import equal_weight
from .head_curves import check_points, from_layer_shape, from_shares
from .head_fisher import SAMPLES, fisher_kl
from .scoring import Evaluator, one_part_compressed

GRID = (0.02, 0.05, 0.1, 0.25, 0.5)
RECALL_CURVES = ("recall", "overlap", "window_recall")  # saved together: the recall pass measures all three
FISHER_CURVES = "fisher"  # the checkpoint entry of the whole Fisher estimate (one pass, resumed whole)


class Checkpoint(Protocol):
    """Where finished curves go while a profile is measured, so an interrupted one resumes (`profile_store`)."""

    def get(self, name: str) -> torch.Tensor | None: ...

    def put(self, tensors: dict[str, torch.Tensor]) -> None: ...


def curve_name(layer: int, head: int | None = None) -> str:
    """The checkpoint name of one unit's sensitivity curves."""
    return f"layer.{layer}" if head is None else f"head.{layer}.{head}"


PROFILED_WINDOWS = (8, 16, 32, 64)  # recent-window sizes whose attention recall is measured


@dataclass
class Profile:
    grid: list[float]
    windows: list[int]
    recall: torch.Tensor  # [L, G] future attention share kept at each ratio (recent-window selection)
    overlap: torch.Tensor  # [L, G] |top by recent ∩ top by future| / k
    window_recall: torch.Tensor  # [L, W] recall at ratio 0.2 for each recent-window size
    sensitivity: torch.Tensor  # [L, G] KL when only this layer is compressed at each ratio (mean over kinds)
    compressible: list[bool]
    meta: dict[str, Any] = field(default_factory=dict)
    parts: torch.Tensor | None = None  # [K, L, G] the same per kind of example; None in profiles made before
    part_names: list[str] = field(default_factory=list)
    head_parts: torch.Tensor | None = None  # [K, L, H, G] KL when only one KV head is compressed; None: not measured

    @property
    def num_layers(self) -> int:
        return self.recall.shape[0]

    def ratio_for_recall(self, level: float) -> list[float]:
        """Per layer, the smallest ratio that keeps `level` of the future attention (linear interpolation)."""
        out = []
        for row in self.recall.tolist():
            pts = list(zip([0.0, *self.grid, 1.0], [0.0, *row, 1.0], strict=True))
            r = 1.0
            for (x1, y1), (x2, y2) in zip(pts, pts[1:], strict=False):
                if y2 >= level:
                    r = x1 + (x2 - x1) * (level - y1) / (y2 - y1) if y2 > y1 else x2
                    break
            out.append(float(min(1.0, max(0.0, r))))
        return out

    def decay_fit(self, level: float = 0.95) -> dict[str, float]:
        """Fit r(l) = a * exp(-b * l / L) + c to the per-layer ratio for `level` (PyramidInfer's decay)."""
        from scipy.optimize import curve_fit

        y = [r for r, c in zip(self.ratio_for_recall(level), self.compressible, strict=True) if c]
        x = [i / self.num_layers for i, c in enumerate(self.compressible) if c]
        if len(y) < 4:
            return {}

        def f(x, a, b, c):
            return a * torch.exp(-b * torch.as_tensor(x)).numpy() + c

        try:  # bounded: a decay (b >= 0) towards a floor c in [0, 1]
            (a, b, c), _ = curve_fit(f, x, y, p0=(0.5, 1.0, 0.1), bounds=([-1, 0, 0], [1, 20, 1]), maxfev=20000)
        except (RuntimeError, ValueError):
            return {}
        pred = f(x, a, b, c)
        ss_res = float(sum((yi - pi) ** 2 for yi, pi in zip(y, pred, strict=True)))
        mean = sum(y) / len(y)
        ss_tot = float(sum((yi - mean) ** 2 for yi in y)) or 1e-12
        return {"a": float(a), "b": float(b), "c": float(c), "r2": 1 - ss_res / ss_tot, "level": level}

    def allocation_curves(self) -> list[list[float]]:
        """The curves a budget is water-filled on: every kind of example weighs by its relative loss."""
        if self.parts is None:
            return self.sensitivity.tolist()
        return equal_weight(self.parts.tolist(), self.compressible)

    def head_allocation_curves(self) -> list[list[list[float]]]:
        """[L][H][G]: the per-head curves a budget is water-filled on, kinds weighed as in `allocation_curves`."""
        k, layers, heads, g = self.head_parts.shape
        units = self.head_parts.reshape(k, layers * heads, g).tolist()
        return group_heads(equal_weight(units, heads_compressible(self.compressible, heads)), heads)

    def predicted_kl(self, ratios: Sequence[float], head_ratios: Sequence[Sequence[float]] | None = None) -> float:
        """Sum of the single-layer (or, given `head_ratios`, single-head) KLs at these shares (piecewise linear
        in the grid, 0 at ratio 1).

        Comparing it with the measured KL of the whole schedule tells whether per-layer errors add up.
        """
        if head_ratios is not None and self.head_parts is not None:
            curves = self.head_parts.mean(0)
            return sum(
                self._interpolate(curves[layer, h].tolist(), r)
                for layer, row in enumerate(head_ratios)
                if self.compressible[layer]
                for h, r in enumerate(row)
            )
        return sum(
            self._interpolate(self.sensitivity[layer].tolist(), r)
            for layer, r in enumerate(ratios)
            if self.compressible[layer]
        )

    def _interpolate(self, curve: list[float], r: float) -> float:
        if r >= 1.0:
            return 0.0
        xs, ys = [*self.grid, 1.0], [*curve, 0.0]
        if r <= xs[0]:
            return ys[0]
        for (x1, y1), (x2, y2) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=True):
            if x1 <= r <= x2:
                return y1 + (y2 - y1) * (r - x1) / (x2 - x1)
        return 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "grid": self.grid,
            "windows": self.windows,
            "compressible": self.compressible,
            "ratio_for_90pct_recall": self.ratio_for_recall(0.9),
            "ratio_for_95pct_recall": self.ratio_for_recall(0.95),
            "decay_fit_95pct": self.decay_fit(0.95),
            "sensitivity": self.sensitivity.tolist(),
            "sensitivity_by_kind": dict(zip(self.part_names, self.parts.tolist(), strict=True))
            if self.parts is not None
            else {},
            "head_sensitivity": self.head_parts.mean(0).tolist() if self.head_parts is not None else None,
            "recall": self.recall.tolist(),
            "overlap": self.overlap.tolist(),
            "window_recall": self.window_recall.tolist(),
            "meta": self.meta,
        }

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Write `<stem>.profile.safetensors` (tensors) and `<stem>.profile.json` (summary), atomically."""
        stem = Path(stem)
        tensors_path = stem.with_name(stem.name + ".profile.safetensors")
        json_path = stem.with_name(stem.name + ".profile.json")
        tensors = {k: getattr(self, k).contiguous() for k in ("recall", "overlap", "window_recall", "sensitivity")}
        if self.parts is not None:
            tensors["sensitivity_parts"] = self.parts.contiguous()
        if self.head_parts is not None:
            tensors["head_sensitivity_parts"] = self.head_parts.contiguous()
        meta = {"grid": json.dumps(self.grid), "windows": json.dumps(self.windows)}
        write_atomic(tensors_path, safetensors.torch.save(tensors, metadata=meta))
        write_atomic(json_path, json.dumps(self.summary(), indent=2) + "\n")
        return tensors_path, json_path

    @classmethod
    def load(cls, stem: str | Path) -> Profile:
        stem = Path(stem)
        base = stem.name.removesuffix(".json").removesuffix(".profile")
        folder = stem.parent
        summary = json.loads((folder / f"{base}.profile.json").read_text())
        t = load_file(str(folder / f"{base}.profile.safetensors"))
        return cls(
            grid=summary["grid"],
            windows=summary["windows"],
            recall=t["recall"],
            overlap=t["overlap"],
            window_recall=t["window_recall"],
            sensitivity=t["sensitivity"],
            compressible=summary["compressible"],
            meta=summary.get("meta", {}),
            parts=t.get("sensitivity_parts"),
            part_names=list(summary.get("sensitivity_by_kind", {})),
            head_parts=t.get("head_sensitivity_parts"),
        )

    def table(self) -> str:
        r90, r95 = self.ratio_for_recall(0.9), self.ratio_for_recall(0.95)
        g = self.grid
        i02 = min(range(len(g)), key=lambda i: abs(g[i] - 0.2))
        head = (
            f"{'layer':>5} {'r@90%':>6} {'r@95%':>6} {'recall@' + format(g[i02], 'g'):>11} "
            f"{'overlap':>8} {'KL@' + format(g[i02], 'g'):>9} {'KL@' + format(g[0], 'g'):>9}"
        )
        lines = [head]
        for layer in range(self.num_layers):
            if not self.compressible[layer]:
                lines.append(f"{layer:>5}  (sliding window: not compressed)")
                continue
            lines.append(
                f"{layer:>5} {r90[layer]:>6.2f} {r95[layer]:>6.2f} {float(self.recall[layer, i02]):>11.3f} "
                f"{float(self.overlap[layer, i02]):>8.3f} {float(self.sensitivity[layer, i02]):>9.4f} "
                f"{float(self.sensitivity[layer, 0]):>9.4f}"
            )
        fit = self.decay_fit(0.95)
        if fit:
            lines.append(
                f"decay fit of r@95%: {fit['a']:.3f} * exp({-fit['b']:+.2f} * l/L) {fit['c']:+.3f}"
                f" (R^2 {fit['r2']:.2f})"
            )
        return "\n".join(lines)


def _attention_recall(
    recent: torch.Tensor,  # [B, H, T] recent-window scores over the context keys
    future_q: torch.Tensor,  # [B, Hq, M, D]
    future_pos: torch.Tensor,  # [B, M]
    keys: torch.Tensor,  # [B, H, T + M, D]
    pos: torch.Tensor,  # [B, H, T + M]
    selectable: torch.Tensor,  # [T] bool: context keys a schedule may drop (not sinks, not the recent window)
    scaling: float,
    grid: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall and overlap [H, G] per KV head at each grid ratio, averaged over rows and future queries."""
    b, hq, m, d = future_q.shape
    h = keys.shape[1]
    g = hq // h
    t = selectable.numel()
    q = future_q.reshape(b, h, g * m, d)
    logits = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling
    visible = pos[:, :, None, :] <= future_pos.repeat(1, g)[:, None, :, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)[..., :t]  # [B, H, G*M, T]
    probs = probs[..., selectable]
    mass = probs.sum(-1).clamp_min(1e-12)  # attention on selectable context keys
    rec = recent[..., selectable]
    future_mean = probs.mean(2)  # [B, H, Tsel]
    order = torch.argsort(rec, dim=-1, descending=True)
    future_order = torch.argsort(future_mean, dim=-1, descending=True)
    n_sel = rec.shape[-1]
    recalls, overlaps = [], []
    for ratio in grid:
        k = max(1, math.ceil(ratio * n_sel))
        keep = torch.zeros_like(rec, dtype=torch.bool).scatter_(-1, order[..., :k], True)
        recalls.append((probs * keep[:, :, None, :]).sum(-1).div(mass).mean((0, 2)))
        top_future = torch.zeros_like(keep).scatter_(-1, future_order[..., :k], True)
        overlaps.append((keep & top_future).sum(-1).float().div(k).mean(0))
    return torch.stack(recalls, -1).cpu(), torch.stack(overlaps, -1).cpu()


@torch.inference_mode()
def attention_recall(
    model,
    evaluator: Evaluator,
    sinks: int,
    window: int,
    selection: Selection,
    grid: list[float],
    windows: list[int],
    progress: Callable[[str, int, int], None] | None = None,
    checkpoint: Checkpoint | None = None,
    by_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recall [L, G], overlap [L, G] and recall at ratio ~0.2 per recent-window size [L, W]: how well the recent
    window's attention picks the keys that the continuation's queries attend to (PyramidInfer's RAC).
    `by_head`: recall and overlap per KV head, [L, H, G] (not checkpointed)."""
    layers = evaluator.layers
    compressible = [c for c, _ in runtime.families.layer_plan(model)]
    kv_heads = runtime.families.model_info(model).num_kv_heads
    recall = torch.zeros(layers, kv_heads, len(grid))
    overlap = torch.zeros(layers, kv_heads, len(grid))
    window_recall = torch.zeros(layers, len(windows))
    i02 = min(range(len(grid)), key=lambda i: abs(grid[i] - 0.2))
    n_batches = len(evaluator.batches)
    m = evaluator.examples[0].continuation.numel()
    ctx_len = evaluator.context_length
    saved = [checkpoint.get(k) for k in RECALL_CURVES] if checkpoint and not by_head else [None]
    if all(t is not None for t in saved):
        if progress:
            progress("attention recall", n_batches, n_batches)
        return tuple(saved)
    for bi, idx in enumerate(evaluator.batches):
        base = evaluator.caches[bi]
        follow = base.fork(Schedule(ratios=[1.0] * layers, window=m, sinks=sinks))
        cont = torch.stack([evaluator.examples[j].continuation for j in idx]).to(model.device)
        with runtime.apply(model, follow.schedule):
            model(cont, cache=follow)
        for layer in range(layers):
            if not compressible[layer]:
                continue
            future = runtime.inspect.recent_queries(follow, layer)
            (stored,) = runtime.inspect.kept(follow, layer)
            scale = runtime.inspect.attention_scale(base, layer)
            for wi, w in enumerate(windows):
                selectable = torch.zeros(ctx_len, dtype=torch.bool)
                selectable[sinks : ctx_len - max(w, window)] = True
                sched = Schedule(ratios=[1.0] * layers, window=w, sinks=sinks, selection=selection)
                scores = runtime.inspect.selection_scores(base, layer, sched, queries=w)
                wanted = grid if w == window else [grid[i02]]
                rec, ov = _attention_recall(
                    scores, future.queries, future.positions, stored.keys, stored.positions, selectable, scale, wanted
                )
                if w == window:
                    recall[layer] += rec / n_batches
                    overlap[layer] += ov / n_batches
                window_recall[layer, wi] += float((rec[:, 0] if w != window else rec[:, i02]).mean()) / n_batches
        if progress:
            progress("attention recall", bi + 1, n_batches)
    if by_head:
        return recall, overlap, window_recall
    recall, overlap = recall.mean(1), overlap.mean(1)
    if checkpoint:
        checkpoint.put(dict(zip(RECALL_CURVES, (recall, overlap, window_recall))))
    return recall, overlap, window_recall


@torch.inference_mode()
def measure(
    model,
    evaluator: Evaluator,
    sinks: int = 4,
    window: int = 32,
    selection: Selection | None = None,
    grid: tuple[float, ...] = GRID,
    windows: tuple[int, ...] = PROFILED_WINDOWS,
    progress: Callable[[str, int, int], None] | None = None,
    also: Sequence[Evaluator] = (),
    per_head: bool = False,
    checkpoint: Checkpoint | None = None,
    head_points: Sequence[float] | None = None,
    head_curves: str = "measured",
    fisher_samples: int = SAMPLES,
    workers: int = 1,
) -> Profile:
    """Recall curves on the evaluator's examples, then single-layer (and, with `per_head`, single-head)
    sensitivity curves.

    Sensitivity is measured on `evaluator` and on each of the `also` evaluators (e.g. retrieval tasks) and kept
    per evaluator (`parts`, named by the kind of their examples); `sensitivity` is their mean KL per token.
    Per-head curves are measured only where a layer has more than one KV head. With a `checkpoint`, every
    finished curve is saved to it and curves it already holds are not measured again. `head_points`: the grid
    ratios at which head curves are measured (None: all); the others come from the layer curve's shape
    (`head_curves.from_layer_shape`), and `meta["head_points"]` records which were measured. `head_curves`
    "fisher": the per-head curves split each measured layer curve by `head_fisher.fisher_kl`'s estimate instead.
    `workers`: processes that measure the sensitivity curves (`unit_pool`; the recall and Fisher passes run here).
    """
    selection = selection or Selection()
    layers = evaluator.layers
    compressible = [c for c, _ in runtime.families.layer_plan(model)]
    grid = list(grid)
    windows = [w for w in windows if w <= evaluator.query_window]
    recall, overlap, window_recall = attention_recall(
        model, evaluator, sinks, window, selection, grid, windows, progress, checkpoint
    )
    base = Schedule(ratios=[1.0] * layers, window=window, sinks=sinks, selection=selection)
    evaluators = [evaluator, *also]
    parts = single_layer_kl(evaluators, base, compressible, grid, progress, checkpoint=checkpoint, workers=workers)
    kv_heads = runtime.families.model_info(model).num_kv_heads
    head_parts = None
    points = check_points(head_points, grid) if head_points is not None else list(range(len(grid)))
    head_meta: dict[str, Any] = {}
    if per_head and kv_heads > 1 and head_curves == "fisher":
        head_parts = fisher_head_kl(
            evaluators, base, compressible, grid, kv_heads, parts, progress, checkpoint, fisher_samples
        )
        head_meta = {"head_curves": {"method": "fisher", "samples": fisher_samples}}
    elif per_head and kv_heads > 1:
        measured = single_layer_kl(
            evaluators,
            base,
            compressible,
            [grid[g] for g in points],
            progress,
            heads=kv_heads,
            checkpoint=checkpoint,
            workers=workers,
        )
        head_parts = from_layer_shape(parts, measured, grid, points)
        head_meta = {"head_points": [grid[g] for g in points]}
    return Profile(
        grid=grid,
        windows=windows,
        recall=recall,
        overlap=overlap,
        window_recall=window_recall,
        sensitivity=parts.mean(0),
        compressible=compressible,
        meta={
            "sinks": sinks,
            "window": window,
            "selection": selection.__dict__,
            "examples": len(evaluator.examples),
            **head_meta,
        },
        parts=parts,
        part_names=[ev.examples[0].kind for ev in evaluators],
        head_parts=head_parts,
    )


def fisher_head_kl(
    evaluators: Sequence[Evaluator],
    base: Schedule,
    compressible: Sequence[bool],
    grid: Sequence[float],
    heads: int,
    parts: torch.Tensor,
    progress: Callable[[str, int, int], None] | None = None,
    checkpoint: Checkpoint | None = None,
    samples: int = SAMPLES,
) -> torch.Tensor:
    """[K, L, H, G]: the measured layer curves `parts` [K, L, G] split over each layer's heads by the Fisher
    estimate from `samples` gradient samples per batch; the estimate ([K, L, H + 1, G], the whole layer's last) is
    one checkpoint entry."""
    saved = checkpoint.get(FISHER_CURVES) if checkpoint else None
    if saved is None or saved.shape != (len(evaluators), len(compressible), heads + 1, len(grid)):
        layers = [i for i, c in enumerate(compressible) if c]
        per_head, per_layer = fisher_kl(evaluators, base, layers, grid, heads, samples=samples, progress=progress)
        saved = torch.cat([per_head, per_layer[:, :, None]], 2)
        if checkpoint:
            checkpoint.put({FISHER_CURVES: saved})
    return from_shares(parts, saved[:, :, :heads], saved[:, :, heads])


def single_layer_kl(
    evaluators: Sequence[Evaluator],
    base: Schedule,
    compressible: Sequence[bool],
    grid: Sequence[float],
    progress: Callable[[str, int, int], None] | None = None,
    heads: int | None = None,
    checkpoint: Checkpoint | None = None,
    workers: int = 1,
) -> torch.Tensor:
    """[K, L, G]: per evaluator, the KL per token when only layer l keeps grid[g] of its context (base elsewhere,
    which must keep every token); with `heads`, [K, L, H, G]: only KV head h of layer l is compressed.
    Each unit's curves [K, G] are taken from `checkpoint` when it holds them, and saved to it when measured;
    `workers` processes measure them (`unit_pool`)."""
    layers = len(compressible)
    units = [(layer, h) for layer in range(layers) if compressible[layer] for h in (range(heads) if heads else [0])]
    out = torch.zeros(len(evaluators), layers, heads or 1, len(grid))
    phase = "head sensitivity" if heads else "layer sensitivity"
    # a curve runs layers l.. and the LM head (about a sixth of the layers' cost here): its share of the work
    cost = {unit: layers - unit[0] + layers / 6 for unit in units}
    total_cost = sum(cost.values())

    def name(unit: tuple[int, int]) -> str:
        return curve_name(unit[0], unit[1] if heads else None)

    def curves(unit: tuple[int, int]) -> torch.Tensor:  # [K, G]
        layer, h = unit
        got = torch.zeros(len(evaluators), len(grid))
        for gi, ratio in enumerate(grid):
            for k, ev in enumerate(evaluators):
                # only this layer is compressed: the continuation runs from it on (exact, and cheaper)
                got[k, gi] = ev.score(one_part_compressed(base, layer, h, ratio, heads), from_layer=layer).kl
        return got

    done = {"units": 0, "work": 0.0}

    def finished(unit: tuple[int, int], got: torch.Tensor, measured: bool = True) -> None:
        layer, h = unit
        out[:, layer, h] = got
        if checkpoint and measured:
            checkpoint.put({name(unit): got.clone()})
        done["units"] += 1
        done["work"] += cost[unit]
        if progress and measured:
            progress(phase, done["units"], len(units), work=(done["work"], total_cost))

    todo = []
    for unit in units:
        saved = checkpoint.get(name(unit)) if checkpoint else None
        if saved is not None and saved.shape == out[:, unit[0], unit[1]].shape:
            finished(unit, saved, measured=False)
        else:
            todo.append(unit)
    if progress:  # the resumed units at once, then the measured ones: the pace counts only these
        progress(phase, done["units"], len(units), work=(done["work"], total_cost))
    unit_pool.run(todo, curves, finished, workers)
    return out if heads else out[:, :, 0]
