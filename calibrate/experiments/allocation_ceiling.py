"""How far can per-layer allocation go on one text? An in-sample ceiling for the sensitivity water-fill.

    python -m calibrate.experiments.allocation_ceiling ../shared/data/gutenberg/pg2701_moby_dick.txt \\
        --schedules schedules/smollm2-135m-instruct_b0.2.json [...] [--budgets 0.2 0.3 0.5] [--windows 8]

Measures every layer's single-layer KL curve on windows of the given text, water-fills each budget on those very
curves, and scores that (in-sample, so optimistic) allocation on the same windows beside uniform and the given
schedules, each beside a uniform of the same KV fraction (within 0.001). If even the in-sample allocation does not
halve uniform's KL, no layer allocation calibrated elsewhere will: the loss is spread over the layers rather than
concentrated in a few. Run it on text that the evaluation does not use, or leave that text out of the evaluation
afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys

from runtime.families import model_info
from runtime.reference import at_budget, rescale_to_budget
from runtime.schedule import load_schedule, write_atomic

from .. import data, evaluator, tasks
from ..allocate import mean_ratio_at, water_fill
from ..models import load_model
from ..pipeline import Progress
from ..profile import GRID, single_layer_kl
from . import check_out

CURVE_GRID = (*GRID, 0.75)  # one more point: at 0.5 budget the upper half of the curve matters
SAME_BUDGET = 1e-3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", help="text file or folder to measure and score on")
    p.add_argument("--schedules", nargs="*", default=[], help="schedule files to score beside the ceiling")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    p.add_argument("--model")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--out", help="also write the results as JSON")
    args = p.parse_args(argv)
    check_out(args.out)
    model, tok = load_model(args.model)
    info = model_info(model)
    layers = info.num_layers
    stream = data.token_stream(tok, data.load_texts([args.text]))
    windows = data.cut_windows(stream, args.context + args.continuation, args.windows, seed=7)
    ev = evaluator.Evaluator(model, tasks.text_examples(windows, args.context))
    base = at_budget("all_ones", layers, prompt_tokens=args.context, model=info)
    compressible = list(info.compressible)
    curves = single_layer_kl([ev], base, compressible, CURVE_GRID, Progress())[0].tolist()
    rows = []

    def add(budget: float, method: str, schedule) -> None:
        kl = ev.score(schedule).kl
        kv = schedule.kv_fraction(args.context)
        rows.append({"budget": budget, "method": method, "kv_fraction": kv, "kl": kl, "ratios": list(schedule.ratios)})

    for b in args.budgets:
        add(b, "uniform", at_budget("uniform", layers, b, prompt_tokens=args.context, model=info))
        mean_ratio = mean_ratio_at(b, args.context, base.sinks + base.window)
        filled = water_fill(curves, CURVE_GRID, mean_ratio, compressible)
        add(b, "in-sample water-fill", rescale_to_budget(base.with_ratios(filled), b, args.context))
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
    print(f"{len(windows)} windows of {args.context} + {args.continuation} tokens of {args.text}, evict mode")
    print("| KV fraction | method | KL | KL / uniform |\n|---|---|---|---|")
    for r in rows:
        uni = next(x["kl"] for x in rows if x["method"] == "uniform" and x["budget"] == r["budget"])
        print(f"| {r['kv_fraction']:.3f} | {r['method']} | {r['kl']:.4f} | {r['kl'] / uni:.2f} |")
    if args.out:
        result = {
            "text": args.text,
            "grid": list(CURVE_GRID),
            "curves": curves,
            "rows": rows,
            "argv": sys.argv[1:] if argv is None else argv,
        }
        write_atomic(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
