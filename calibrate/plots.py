"""Plots of evaluation results (matplotlib, Agg backend): quality against KV fraction, needle heat maps.

The functions take the summary rows of `calibrate.report.summarize` (or the records of an eval results.json)
and return the matplotlib Figure; `save` writes it as PNG. Notebooks can call them directly:

    from calibrate import plots, report
    rows = report.summarize(report.load("runs/eval_x/results.json"))
    fig = plots.quality_vs_kv(rows)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (row field, axis label, lower is better)
PANELS = [
    ("lm_kl", "WikiText-2 KL(full || compressed), nats/token", True),
    ("lm_ppl", "WikiText-2 perplexity", True),
    ("longbench_score", "LongBench-E average score", False),
    ("longbench_gold_nll", "LongBench-E gold answer NLL, nats/token", True),
    ("needle_in-prompt", "needle exact match % (question in prompt)", False),
    ("needle_after-compression", "needle exact match % (question after compression)", False),
]

_STYLE = {
    "uniform": ("tab:blue", "o"),
    "pyramidkv": ("tab:orange", "s"),
    "pyramidinfer": ("tab:red", "^"),
    "streamingllm": ("tab:purple", "v"),
    "random": ("tab:gray", "x"),
}


_RANK = {m: i for i, m in enumerate(["full", "uniform", "pyramidkv", "pyramidinfer", "streamingllm", "random"])}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(method: str, i: int) -> tuple[str, str]:
    if method in _STYLE:
        return _STYLE[method]
    extra = ["tab:green", "tab:olive", "tab:cyan", "tab:brown", "tab:pink"]
    return extra[i % len(extra)], "D"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _kv(row: dict[str, Any], task: str) -> float | None:
    """The KV fraction measured on that task's prompts (a fixed-ratio schedule keeps a different share of each
    prompt length), else the row's overall one."""
    return (row.get("kv_by_task") or {}).get(task, row.get("kv_fraction"))


def quality_vs_kv(rows: Sequence[dict[str, Any]], panels: Sequence[tuple[str, str, bool]] = PANELS, title: str = ""):
    """One panel per quality measure: mean (with its 95% CI) against the measured KV fraction, a line per method
    and prefill mode across budgets (methods set slightly apart along x); the full cache as a dashed line."""
    plt = _pyplot()
    present = [p for p in panels if any(_finite((r.get(p[0]) or {}).get("mean")) for r in rows)]
    if not present:
        present = list(panels[:1])
    cols = min(3, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    methods = sorted(
        {(r["method"], r["mode"]) for r in rows if r["method"] != "full"},
        key=lambda m: (_RANK.get(m[0], len(_RANK)), m[0], m[1]),
    )
    for ax, (name, label, lower) in zip(axes.flat, present):
        full = [r for r in rows if r["method"] == "full" and _finite((r.get(name) or {}).get("mean"))]
        if full:
            ax.axhline(full[0][name]["mean"], color="black", ls="--", lw=1, label="full cache")
        for i, (method, mode) in enumerate(methods):
            pts = [
                r
                for r in rows
                if r["method"] == method and r["mode"] == mode and _finite((r.get(name) or {}).get("mean"))
            ]
            task = name.split("_")[0]
            pts = [(_kv(r, task), r) for r in pts]
            pts = sorted(((k, r) for k, r in pts if _finite(k)), key=lambda p: p[0])
            if not pts:
                continue
            dodge = (i - (len(methods) - 1) / 2) * 0.008  # side by side, so the error bars stay readable
            x = [k + dodge for k, _ in pts]
            pts = [r for _, r in pts]
            y = [r[name]["mean"] for r in pts]
            lo = [max(0.0, r[name]["mean"] - r[name]["ci_low"]) for r in pts]
            hi = [max(0.0, r[name]["ci_high"] - r[name]["mean"]) for r in pts]
            color, marker = _style(method, i)
            ls = "-" if mode == "evict" else ":"
            lab = method if len({m for _, m in methods}) == 1 else f"{method} ({mode})"
            ax.errorbar(x, y, yerr=[lo, hi], color=color, marker=marker, ls=ls, capsize=3, lw=1.3, ms=5, label=lab)
        if full:
            ax.plot([1.0], [full[0][name]["mean"]], marker="*", color="black", ms=9, ls="none")
        ax.set_xlim(0, 1.04)
        ax.set_xlabel("KV fraction kept (measured)")
        ax.set_ylabel(label + (" (lower is better)" if lower else ""), fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    top = 0.97
    if title:
        fig.suptitle(title, y=0.995, fontsize=9)
        top = 0.95
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, top), ncol=min(len(labels), 7),
                   fontsize=8, frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, top - 0.05 * (3 / (2 + nrows))))
    return fig


def needle_grid(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float, str, str], dict[tuple[int, int], float]]:
    """{(method, budget, mode, question): {(depth, length): accuracy %}} from needle records."""
    grid: dict[tuple[str, float, str, str], dict[tuple[int, int], float]] = {}
    for r in records:
        if r.get("task") != "needle":
            continue
        key = (r["method"], r["budget"], r["mode"], r["question"])
        grid.setdefault(key, {})[(r["depth"], r["length"])] = r["stats"]["correct"]["mean"]
    return grid


def needle_heatmaps(records: Sequence[dict[str, Any]], budget: float, mode: str = "evict", question: str = "in-prompt"):
    """Depth x length heat maps of needle exact match, one panel per method at `budget` (the full cache first)."""
    plt = _pyplot()
    grid = needle_grid(records)
    keys = [k for k in grid if k[3] == question and (k[0] == "full" or (k[1] == budget and k[2] == mode))]
    keys.sort(key=lambda k: (_RANK.get(k[0], len(_RANK)), k[0]))
    if not keys:
        raise ValueError(f"no needle results for budget {budget}, mode {mode}, question {question}")
    depths = sorted({d for k in keys for d, _ in grid[k]})
    lengths = sorted({n for k in keys for _, n in grid[k]})
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    width = max(2.8, 0.75 * len(lengths) + 1.4)
    height = max(2.2, 0.38 * len(depths) + 1.4)
    fig, axes = plt.subplots(nrows, cols, figsize=(width * cols + 1.2, height * nrows + 0.6), squeeze=False,
                             layout="constrained")  # fmt: skip
    image = None
    for i, (ax, key) in enumerate(zip(axes.flat, keys)):
        cells = grid[key]
        data = [[cells.get((d, n), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(data, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for r, row in enumerate(data):
            for c, v in enumerate(row):
                if _finite(v):
                    ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths], fontsize=7)
        ax.set_title(key[0] if key[0] == "full" else f"{key[0]} @ {key[1]:g}", fontsize=8)
        ax.set_xlabel("prompt tokens", fontsize=7)
        if i % cols == 0:
            ax.set_ylabel("needle depth", fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="exact match %")
    fig.suptitle(f"needle retrieval, question {question}, KV budget {budget:g} ({mode})", fontsize=9)
    return fig


def save(fig, path: str | Path) -> Path:
    """Write a figure as PNG (atomically: a temporary file renamed into place) and close it."""
    import os
    import tempfile

    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path
