"""How far can per-layer allocation go on one text? An in-sample ceiling for the sensitivity water-fill.

    python -m calibrate.experiments.allocation_ceiling ../shared/data/gutenberg/pg2701_moby_dick.txt \\
        --schedules schedules/smollm2-135m-instruct_b0.2.json [...] [--budgets 0.2 0.3 0.5] [--windows 8] \\
        [--per-head] [--curves-from ../shared/data/tinyshakespeare]

Measures every layer's single-layer KL curve on windows of the given text, water-fills each budget on those very
curves, and scores that (in-sample, so optimistic) allocation on the same windows beside uniform and the given
schedules, each beside a uniform of the same KV fraction (within 0.001). If even the in-sample allocation does not
halve uniform's KL, no layer allocation calibrated elsewhere will: the loss is spread over the layers rather than
concentrated in a few. Run it on text that the evaluation does not use, or leave that text out of the evaluation
afterwards.

--per-head asks the same of a finer allocation: every KV head gets its own curve (only that head of that layer
compressed) and its own share, water-filled over all heads at the same mean. The runtime stores a layer's heads
at one length, so this is a ceiling for ragged per-head caches (AdaKV-style), not something it can serve.

--curves-from measures the curves on other text (as calibration would) and scores on the given text: the same
allocations, out of sample.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from runtime.cache import PyramidCache
from runtime.families import model_info
from runtime.reference import at_budget, rescale_to_budget
from runtime.schedule import Schedule, kept_tokens, load_schedule, write_atomic

from .. import data, evaluator, tasks
from ..allocate import mean_ratio_at, water_fill
from ..models import load_model
from ..pipeline import Progress
from ..profile import GRID, single_layer_kl
from . import check_out

CURVE_GRID = (*GRID, 0.75)  # one more point: at 0.5 budget the upper half of the curve matters
SAME_BUDGET = 1e-3


def trim_heads(cache: PyramidCache, schedule: Schedule, heads: list[list[float]]) -> None:
    """Cut each KV head h of layer l to `heads[l][h]` of the context, by the schedule's own scores.

    A layer's heads stay one rectangular tensor: a head that keeps fewer tokens than the layer's largest marks its
    surplus slots invalid, which the masks then respect.
    """
    if not schedule.selection.per_head or min(schedule.ratios) < 1.0:
        raise ValueError("per-head shares need a schedule that keeps every token and selects per head")
    n = cache.seen_slots
    for layer, ratios in zip(cache.layers, heads, strict=True):
        if min(ratios) >= 1.0:
            continue
        counts = [kept_tokens(r, n, schedule.sinks, schedule.window) for r in ratios]
        scores = layer.scores(schedule, layer.scaling)
        keep = torch.tensor(counts, device=scores.device).expand(scores.shape[0], -1)
        layer.trim(scores, schedule, None, max(counts), keep=keep)


def head_kv_fraction(heads: list[list[float]], schedule: Schedule, n: int) -> float:
    """Mean KV fraction over heads: each head index across the layers is a layer schedule of its own."""
    h = len(heads[0])
    return sum(schedule.with_ratios([hs[i] for hs in heads]).kv_fraction(n) for i in range(h)) / h


class PerHead(evaluator.Evaluator):
    """An evaluator that can also score per-head shares (`score_heads`) on top of a schedule that keeps all."""

    heads: list[list[float]] | None = None

    def compressed_cache(self, batch: int, schedule: Schedule) -> PyramidCache:
        cache = super().compressed_cache(batch, schedule)
        if self.heads is not None:
            trim_heads(cache, schedule, self.heads)
        return cache

    def score_heads(self, schedule: Schedule, heads: list[list[float]]) -> evaluator.Scores:
        self.heads = heads
        try:
            return self.score(schedule)
        finally:
            self.heads = None

    def head_curves(self, base: Schedule, compressible: list[bool], grid, progress) -> list[list[list[float]]]:
        """[L][H][G]: the KL when only head h of layer l keeps grid[g] of its context."""
        num_heads = self.caches[0].layers[0].keys.shape[1]
        curves = [[[0.0] * len(grid) for _ in range(num_heads)] for _ in compressible]
        total, done = sum(compressible) * num_heads * len(grid), 0
        for layer, c in enumerate(compressible):
            for h in range(num_heads if c else 0):
                for g, ratio in enumerate(grid):
                    heads = [[1.0] * num_heads for _ in compressible]
                    heads[layer][h] = ratio
                    curves[layer][h][g] = self.score_heads(base, heads).kl
                    done += 1
                    progress("head sensitivity", done, total)
        return curves


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="+", help="text files or folders to score on (and measure on, by default)")
    p.add_argument(
        "--curves-from", nargs="+", metavar="TEXT", help="measure the curves on this text instead: not in-sample"
    )
    p.add_argument("--schedules", nargs="*", default=[], help="schedule files to score beside the ceiling")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    p.add_argument("--model")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--curve-windows", type=int, help="windows of --curves-from to measure on (default: --windows)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--per-head", action="store_true", help="also the per-KV-head ceiling (heads x the time)")
    p.add_argument("--out", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.curve_windows and not args.curves_from:
        p.error("--curve-windows applies to --curves-from text; without it the curves use --windows")
    check_out(args.out)
    model, tok = load_model(args.model)
    info = model_info(model)
    layers = info.num_layers

    def evaluator_on(texts: list[str], count: int) -> PerHead:
        stream = data.token_stream(tok, data.load_texts(texts))
        windows = data.cut_windows(stream, args.context + args.continuation, count, seed=7)
        return PerHead(model, tasks.text_examples(windows, args.context))

    ev = evaluator_on(args.text, args.windows)
    measured = evaluator_on(args.curves_from, args.curve_windows or args.windows) if args.curves_from else ev
    sample = "" if args.curves_from else "in-sample "  # in the method names
    base = at_budget("all_ones", layers, prompt_tokens=args.context, model=info)
    compressible = list(info.compressible)
    progress = Progress()
    curves = single_layer_kl([measured], base, compressible, CURVE_GRID, progress)[0].tolist()
    head_curves = measured.head_curves(base, compressible, CURVE_GRID, progress) if args.per_head else None
    rows = []

    def add(budget: float, method: str, schedule, heads: list[list[float]] | None = None) -> None:
        if heads is None:
            kl, kv = ev.score(schedule).kl, schedule.kv_fraction(args.context)
        else:
            kl, kv = ev.score_heads(schedule, heads).kl, head_kv_fraction(heads, schedule, args.context)
        ratios = heads or list(schedule.ratios)
        rows.append({"budget": budget, "method": method, "kv_fraction": kv, "kl": kl, "ratios": ratios})

    for b in args.budgets:
        add(b, "uniform", at_budget("uniform", layers, b, prompt_tokens=args.context, model=info))
        mean_ratio = mean_ratio_at(b, args.context, base.sinks + base.window)
        filled = water_fill(curves, CURVE_GRID, mean_ratio, compressible)
        add(b, f"{sample}water-fill", rescale_to_budget(base.with_ratios(filled), b, args.context))
        if head_curves is not None:
            h = len(head_curves[0])
            units = [c for c in compressible for _ in range(h)]
            flat = water_fill([c for hs in head_curves for c in hs], CURVE_GRID, mean_ratio, units)
            add(b, f"{sample}per-head water-fill", base, [flat[i * h : (i + 1) * h] for i in range(layers)])
    for path in args.schedules:
        schedule = load_schedule(path)
        kv = schedule.kv_fraction(args.context)
        # compared with a uniform of the same memory: one already scored when within SAME_BUDGET (0.19998 for
        # 0.2002), else one built at this schedule's own KV fraction
        same = [r for r in rows if r["method"] == "uniform" and abs(r["kv_fraction"] - kv) < SAME_BUDGET]
        if not same:
            add(kv, "uniform", at_budget("uniform", layers, kv, prompt_tokens=args.context, model=info))
        add(same[0]["budget"] if same else kv, path, schedule)
    rows.sort(key=lambda r: r["budget"])  # stable: each budget's uniform first
    print(f"{len(ev.examples)} windows of {args.context} + {args.continuation} tokens of {' '.join(args.text)}")
    if args.curves_from:
        print(f"curves measured on {len(measured.examples)} windows of {' '.join(args.curves_from)}")
    print("| KV fraction | method | KL | KL / uniform |\n|---|---|---|---|")
    for r in rows:
        uni = next(x["kl"] for x in rows if x["method"] == "uniform" and x["budget"] == r["budget"])
        print(f"| {r['kv_fraction']:.3f} | {r['method']} | {r['kl']:.4f} | {r['kl'] / uni:.2f} |")
    if args.out:
        result = {
            "text": args.text,
            "curves_from": args.curves_from or args.text,
            "windows": len(ev.examples),
            "curve_windows": len(measured.examples),
            "grid": list(CURVE_GRID),
            "curves": curves,
            "head_curves": head_curves,
            "rows": rows,
            "argv": sys.argv[1:] if argv is None else argv,
        }
        write_atomic(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
