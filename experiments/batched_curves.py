"""Whether several grid ratios of one unit should share one forward as a larger batch (issue: calibration speed).

    python -m experiments.batched_curves [--model M] [--context 1024] [--continuation 128] [--out FILE]

A sensitivity curve runs one continuation forward per grid ratio over a batch of windows. Batching the ratios
would run one forward over windows x ratios rows instead. This times the continuation forward of the stock model
over a prefilled cache at batch 3 (the default text windows) and at 2x, 5x (the grid) that, per 3 rows, medians
of --repeats alternating runs; a ratio below 1 means batching pays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

import runtime
from calibrate.models import load_model
from runtime.schedule import write_atomic

from . import check_out

ROWS = 3  # calibrate run's default text windows per batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--factors", default="1,2,5", help="batch multiples of 3 rows to time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    check_out(args.out)
    factors = [int(f) for f in args.factors.split(",")]
    model, _ = load_model(args.model)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ctx = torch.randint(0, vocab, (ROWS, args.context), generator=g)
    cont = torch.randint(0, vocab, (ROWS, args.continuation), generator=g)
    with torch.inference_mode():
        prompt = runtime.cache_of(model(ctx, use_cache=True))
        times: dict[int, list[float]] = {f: [] for f in factors}
        for _ in range(args.repeats):
            for f in factors:  # alternating, so drifts of the machine hit every size alike
                cache = DynamicCache()
                for i, layer in enumerate(prompt.layers):
                    cache.update(layer.keys.repeat(f, 1, 1, 1), layer.values.repeat(f, 1, 1, 1), i)
                x = cont.repeat(f, 1)
                t = time.perf_counter()
                model(x, cache=cache)
                times[f].append((time.perf_counter() - t) / f)
    base = statistics.median(times[factors[0]])
    rows = [
        {"rows": ROWS * f, "seconds_per_3_rows": round(statistics.median(times[f]), 4),
         "vs_3_rows": round(statistics.median(times[f]) / base, 3)}
        for f in factors
    ]  # fmt: skip
    print("| rows per forward | seconds per 3 rows | vs 3 rows |\n|---|---|---|")
    for r in rows:
        print(f"| {r['rows']} | {r['seconds_per_3_rows']:.3f} | {r['vs_3_rows']:.2f}x |")
    if args.out:
        meta = {"context": args.context, "continuation": args.continuation, "threads": torch.get_num_threads()}
        write_atomic(args.out, json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
