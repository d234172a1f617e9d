"""How far can per-layer allocation go on one text? An in-sample ceiling for the sensitivity water-fill.

    python -m experiments.allocation_ceiling ../shared/data/gutenberg/pg2701_moby_dick.txt \\
        --schedules schedules/smollm2-135m-instruct_b0.2.json [...] [--budgets 0.2 0.3 0.5] [--windows 8] \\
        [--per-head] [--curves-from ../shared/data/tinyshakespeare]

Measures every layer's single-layer KL curve on windows of the given text, water-fills each budget on those very
curves, and scores that (in-sample, so optimistic) allocation on the same windows beside uniform and the given
schedules, each beside a uniform of the same KV fraction (within 0.001). If even the in-sample allocation does not
halve uniform's KL, no layer allocation calibrated elsewhere will: the loss is spread over the layers rather than
concentrated in a few. Run it on text that the evaluation does not use, or leave that text out of the evaluation
afterwards.

--per-head asks the same of a finer allocation: every KV head gets its own curve (only that head of that layer
compressed) and its own share, water-filled over all heads at the same mean (a schedule with `head_ratios`, which
the runtime serves with one buffer per KV head where a layer's heads keep different shares).

--curves-from measures the curves on other text (as calibration would) and scores on the given text: the same
allocations, out of sample.
"""

from __future__ import annotations

import argparse
import json
import sys

from calibrate import data, tasks
from calibrate import scoring as evaluator
from calibrate.allocate import mean_ratio_at, water_fill, water_fill_heads
from calibrate.models import load_model
from calibrate.profiling import GRID, single_layer_kl
from calibrate.progress import Progress
from runtime.families import model_info
from runtime.reference import at_budget, rescale_to_budget
from runtime.schedule import Schedule, load_schedule, write_atomic

from . import check_out

CURVE_GRID = (*GRID, 0.75)  # one more point: at 0.5 budget the upper half of the curve matters
SAME_BUDGET = 1e-3


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

    def evaluator_on(texts: list[str], count: int) -> evaluator.Evaluator:
        stream = data.token_stream(tok, data.load_texts(texts))
        windows = data.cut_windows(stream, args.context + args.continuation, count, seed=7)
        return evaluator.Evaluator(model, tasks.text_examples(windows, args.context))

    ev = evaluator_on(args.text, args.windows)
    measured = evaluator_on(args.curves_from, args.curve_windows or args.windows) if args.curves_from else ev
    sample = "" if args.curves_from else "in-sample "  # in the method names
    base = at_budget("all_ones", layers, prompt_tokens=args.context, model=info)
    compressible = list(info.compressible)
    progress = Progress()
    curves = single_layer_kl([measured], base, compressible, CURVE_GRID, progress)[0].tolist()
    head_curves = None
    if args.per_head:
        kv_heads = info.num_kv_heads
        head_curves = single_layer_kl([measured], base, compressible, CURVE_GRID, progress, heads=kv_heads)[0].tolist()
    rows = []

    def add(budget: float, method: str, schedule: Schedule) -> None:
        kl, kv = ev.score(schedule).kl, schedule.kv_fraction(args.context)
        ratios = schedule.head_ratios or list(schedule.ratios)
        rows.append({"budget": budget, "method": method, "kv_fraction": kv, "kl": kl, "ratios": ratios})

    for b in args.budgets:
        add(b, "uniform", at_budget("uniform", layers, b, prompt_tokens=args.context, model=info))
        mean_ratio = mean_ratio_at(b, args.context, base.sinks + base.window)
        filled = water_fill(curves, CURVE_GRID, mean_ratio, compressible)
        add(b, f"{sample}water-fill", rescale_to_budget(base.with_ratios(filled), b, args.context))
        if head_curves is not None:
            shares = water_fill_heads(head_curves, CURVE_GRID, mean_ratio, compressible)
            add(b, f"{sample}per-head water-fill", base.with_head_ratios(shares))
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
