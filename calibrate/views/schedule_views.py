"""Views of a `Schedule`: the reference schedules at its budget, retention and kept tokens per layer, the share
each KV head keeps, and how it was made (its provenance)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .display import _fmt, _heat, _styled, _tab, figure

REFERENCE_KINDS = ("uniform", "pyramidkv", "pyramidinfer")
_COLORS = {
    "calibrated": "tab:green",
    "uniform": "tab:blue",
    "pyramidkv": "tab:orange",
    "pyramidinfer": "tab:red",
    "sensitivity": "tab:purple",
    "full": "black",
}


def schedule_budget(schedule) -> float:
    return schedule.budget if schedule.budget is not None else schedule.kv_fraction()


def references(schedule, kinds: Sequence[str] = REFERENCE_KINDS) -> dict[str, Any]:
    """The reference schedules at the schedule's budget, prompt length, window and sinks."""
    from runtime.reference import at_budget

    return {
        kind: at_budget(
            kind,
            schedule.num_layers,
            schedule_budget(schedule),
            prompt_tokens=schedule.context_length,
            model=schedule.model,
            window=schedule.window,
            sinks=schedule.sinks,
        )
        for kind in kinds
    }


@_styled
def retention(schedules: Mapping[str, Any], prompt_tokens: int | None = None) -> Any:
    """Per-layer retention ratios of several schedules (e.g. {"calibrated": s, **references(s)}) on one axis;
    the legend gives each one's KV fraction at `prompt_tokens` (default: the first one's context length)."""
    fig, ax = figure(7.5, 3.6)
    first = next(iter(schedules.values()))
    n = prompt_tokens or first.context_length
    for i, (name, s) in enumerate(schedules.items()):
        bold = i == 0
        ax.plot(
            range(s.num_layers),
            s.ratios,
            "o-" if bold else ".-",
            color=_COLORS.get(name, _tab(i)),
            lw=2.2 if bold else 1.1,
            ms=4 if bold else 3,
            label=f"{name} (KV {s.kv_fraction(n):.3f})",
            zorder=3 if bold else 2,
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("retention ratio")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"retention per layer at equal KV budget ({n} prompt tokens)", fontsize=9)
    return fig


@_styled
def kept_tokens(schedules: Mapping[str, Any], prompt_tokens: int) -> Any:
    """Tokens each layer holds after prefilling `prompt_tokens` tokens (`Schedule.kept_tokens`): the first
    schedule as bars, the others as lines, the full cache as a dashed line."""
    fig, ax = figure(7.5, 3.4)
    for i, (name, s) in enumerate(schedules.items()):
        kept = s.kept_tokens(prompt_tokens)
        label = f"{name} ({sum(kept) / len(kept):.0f} mean, KV {s.kv_fraction(prompt_tokens):.3f})"
        color = _COLORS.get(name, _tab(i))
        if i == 0:
            ax.bar(range(len(kept)), kept, color=color, alpha=0.6, label=label)
        else:
            ax.plot(range(len(kept)), kept, ".-", lw=1, ms=3, color=color, label=label)
    ax.axhline(prompt_tokens, color="black", ls="--", lw=1, label=f"full cache ({prompt_tokens})")
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens kept")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    ax.set_title(f"tokens kept per layer after a {prompt_tokens}-token prompt", fontsize=9)
    return fig


@_styled
def head_shares(schedule=None, profile=None, ratio: float = 0.1, floor: float = 1e-6) -> Any:
    """Left: the share of the context each KV head of each layer keeps (`head_ratios`). Right: the KL when only
    that head is compressed to the grid ratio nearest `ratio` (the profile's per-head curves, kinds averaged, log
    colour): the shares follow it. Either panel is left out when its data is missing (a per-layer schedule, a
    profile without per-head curves); None when both are. Layers the runtime never compresses are blank."""
    from matplotlib.colors import LogNorm

    shares = schedule.head_ratios if schedule is not None else None
    head_kl = profile.head_parts.mean(0) if profile is not None and profile.head_parts is not None else None
    panels = [p for p in (shares, head_kl) if p is not None]
    if not panels:
        return None
    compressible = schedule.compressible() if schedule is not None else profile.compressible
    fig, axes = figure(3.2 * len(panels) + 1.6, 0.19 * len(panels[0]) + 1.6, ncols=len(panels))
    axes = list(axes) if len(panels) > 1 else [axes]

    if shares is not None:
        ax = axes.pop(0)
        rows = [[float(v) if compressible[i] else math.nan for v in row] for i, row in enumerate(shares)]
        image = _heat(ax, rows, "{:.2g}", lambda v: "white" if v < 0.6 else "black", vmin=0, vmax=1, cmap="viridis")
        fig.colorbar(image, ax=ax, label="share kept", shrink=0.8)
        ax.set_title(f"share kept per KV head (KV {schedule.kv_fraction():.3f})", fontsize=9)
    if head_kl is not None:
        ax = axes.pop(0)
        grid = list(profile.grid)
        g = min(range(len(grid)), key=lambda j: abs(grid[j] - ratio))
        rows = [[max(float(v), floor) if c else math.nan for v in head_kl[i, :, g]] for i, c in enumerate(compressible)]
        finite = [v for row in rows for v in row if math.isfinite(v)]
        norm = LogNorm(vmin=min(finite), vmax=max(finite))
        image = _heat(ax, rows, "{:.1e}", lambda v: "white" if norm(v) < 0.6 else "black", norm=norm, cmap="magma")
        fig.colorbar(image, ax=ax, label="KL, nats/token", shrink=0.8)
        ax.set_title(f"KL when only that head keeps {grid[g]:g}", fontsize=9)
    for ax in fig.axes[: len(panels)]:
        ax.set_xticks(range(len(panels[0][0])))
        ax.set_xlabel("KV head")
    return fig


def provenance_text(schedule) -> str:
    """How the schedule was made: settings, the command, and the validation scores of the baselines against the
    calibrated one (objective, KL, task accuracy), the margin, and the additivity check of the KL."""
    p = schedule.provenance or {}
    model = schedule.model.name if schedule.model else "-"
    lines = [
        f"schedule {schedule.name or '-'}: model {model}, {schedule.num_layers} layers, budget "
        f"{_fmt(schedule.budget, 3)} at {schedule.context_length} prompt tokens (KV fraction "
        f"{schedule.kv_fraction():.3f}), window {schedule.window}, sinks {schedule.sinks}, "
        f"prefill {schedule.prefill_mode}",
        f"selection: {', '.join(f'{k}={v}' for k, v in vars(schedule.selection).items())}",
    ]
    for key, label in (("command", "command"), ("created", "created"), ("metric", "metric")):
        if key in p:
            lines.append(f"{label}: {p[key]}")
    if "trial" in p:
        lines.append(f"best trial: {p['trial']} of {p.get('trials', '?')} finished (params {p.get('params', {})})")
    data = p.get("data") or {}
    if data:
        lines.append(
            f"data: {', '.join(map(str, data.get('sources', [])))} ({data.get('tokens', '?')} tokens); "
            f"calibration {data.get('calibration', {})}, validation {data.get('validation', {})}"
        )
    if "reference" in p:
        lines.append(f"reference shape: {p['reference']}")
    baselines = dict(p.get("baselines") or {})
    score = p.get("score") or {}
    if baselines or score:
        cols = ("objective", "kl", "task_kl", "accuracy", "ppl", "kv_fraction")
        lines += ["", "validation (lower objective and KL are better):"]
        lines.append(f"  {'schedule':<13}" + "".join(f"{c:>12}" for c in cols))
        for name, v in [*baselines.items(), ("calibrated", score)]:
            lines.append(f"  {name:<13}" + "".join(f"{_fmt(v.get(c)):>12}" for c in cols))
    if p.get("margin_vs_best_baseline") is not None:
        best = min(baselines, key=lambda k: baselines[k].get("objective", math.inf)) if baselines else "?"
        lines.append(f"margin vs the best baseline ({best}): {p['margin_vs_best_baseline']:+.4f} (positive: better)")
    add = p.get("additivity")
    if add:
        total, measured = add.get("sum_of_single_layer_kl"), add.get("measured_kl")
        ratio = total / measured if isinstance(total, float) and measured else None
        lines.append(
            f"additivity: sum of single-layer KLs {_fmt(total)} vs measured KL {_fmt(measured)}"
            + (f" (ratio {ratio:.2f}; 1 means the per-layer errors add up)" if ratio else "")
        )
    elif baselines or score:
        lines.append("additivity: not recorded in this schedule (made before the check existed)")
    return "\n".join(lines)
