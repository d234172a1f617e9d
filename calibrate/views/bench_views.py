"""Views of a `calibrate bench --out` result: loading it and the stock / schedule bar charts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .display import _fmt, _styled, figure


def load_bench(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    missing = [k for k in ("stock", "schedule", "ratios") if k not in data]
    if missing:
        raise ValueError(f"{path} is not a `calibrate bench --out` result (no {', '.join(missing)})")
    return data


@_styled
def bench_bars(result: Mapping[str, Any], title: str = "") -> Any:
    """Stock against schedule from one `calibrate bench` result: speed (prefill seconds, decode tokens/s),
    memory (KV after prefill and at the end, peak, MiB), and every ratio schedule / stock."""
    fig, axes = figure(13, 3.6, ncols=3)
    stock, ours, ratios = result["stock"], result["schedule"], result["ratios"]
    mb = 1 / 2**20

    def pair(ax, items, ylabel):
        width = 0.38
        xs = range(len(items))
        for j, (who, data, color) in enumerate((("stock", stock, "tab:gray"), ("schedule", ours, "tab:green"))):
            vals = [data[key] * scale for _, key, scale in items]
            bars = ax.bar([x + (j - 0.5) * width for x in xs], vals, width, color=color, label=who)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(list(xs), [label for label, _, _ in items], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)

    pair(axes[0], [("prefill s", "prefill_s", 1.0), ("decode tok/s", "decode_tokens_per_s", 1.0)], "seconds | tokens/s")
    axes[0].set_title("speed", fontsize=9)
    pair(
        axes[1],
        [("KV prefill", "kv_bytes_prefill", mb), ("KV end", "kv_bytes_end", mb), ("peak", "peak_memory_bytes", mb)],
        "MiB",
    )
    axes[1].set_title("memory", fontsize=9)
    names = {
        "prefill_s": "prefill time",
        "decode_tokens_per_s": "decode speed",
        "kv_bytes_prefill": "KV prefill",
        "kv_bytes_end": "KV end",
        "peak_memory_bytes": "peak memory",
        "largest_batch": "largest batch",
    }
    keys = [k for k in names if k in ratios]
    better_up = {"decode_tokens_per_s", "largest_batch"}
    colors = ["tab:green" if (ratios[k] > 1) == (k in better_up) else "tab:red" for k in keys]
    bars = axes[2].barh([names[k] for k in keys], [ratios[k] for k in keys], color=colors)
    axes[2].bar_label(bars, fmt="%.2fx", fontsize=7, padding=2)
    axes[2].set_xlim(0, max(1.0, *(ratios[k] for k in keys)) * 1.18)
    axes[2].axvline(1, color="black", lw=1)
    axes[2].invert_yaxis()
    axes[2].set_xlabel("schedule / stock (green: better)")
    axes[2].grid(alpha=0.3, axis="x")
    axes[2].set_title("ratios", fontsize=9)
    head = title or (
        f"{result.get('model', '')} {result.get('dtype', '')} on {result.get('device_name', result.get('device', ''))}"
        f": {result.get('schedule_name', '')} ({result.get('prefill_mode', '')}, KV "
        f"{_fmt(result.get('kv_fraction'), 3)}), batch {result.get('batch')} x {result.get('prompt_tokens')} tokens "
        f"+ {result.get('new_tokens')} new, median of {result.get('repeats')}"
    )
    fig.suptitle(head, fontsize=9)
    return fig
