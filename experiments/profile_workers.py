"""Sensitivity curves measured by one process on all of torch's threads against worker processes sharing them,
side by side, on what `calibrate run` profiles by default.

    python -m experiments.profile_workers [--workers 2] [--layers 0 7 14 22 29] [--rounds 3] \\
        [--out docs/results/profile_workers_smollm2.json]

The same head units (every KV head of the given layers, the default grid of 5 ratios x 2 kinds) are measured by
`calibrate.profiling.single_layer_kl` with `workers` 1 (torch on all cores) and with `--workers` forked processes,
alternating, `--rounds` times each; the curves must agree to float rounding (a worker runs torch on fewer threads,
which may sum in another order).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from calibrate.profiling import GRID, single_layer_kl
from runtime.families import layer_plan
from runtime.schedule import write_atomic

from . import check_out, default_profile_evaluators


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 7, 14, 22, 29])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    check_out(args.out)
    model, evaluators, base = default_profile_evaluators()
    heads = model.config.num_key_value_heads
    # only the chosen layers are measured: the others count as not compressible here
    chosen = [c and i in args.layers for i, (c, _) in enumerate(layer_plan(model))]
    threads = torch.get_num_threads()
    seconds: dict[int, list[float]] = {1: [], args.workers: []}
    curves: dict[int, torch.Tensor] = {}
    for r in range(args.rounds):
        for workers in (1, args.workers):
            t = time.perf_counter()
            curves[workers] = single_layer_kl(evaluators, base, chosen, GRID, heads=heads, workers=workers)
            seconds[workers].append(time.perf_counter() - t)
            print(f"round {r + 1}: {workers} process(es): {seconds[workers][-1]:.1f} s", flush=True)
    one, many = curves[1], curves[args.workers]
    mask = one > 0
    rel = float(((many - one).abs()[mask] / one[mask]).max()) if mask.any() else 0.0
    t1, tn = statistics.median(seconds[1]), statistics.median(seconds[args.workers])
    result = {
        "layers": args.layers,
        "kv_heads": heads,
        "units": len(args.layers) * heads,
        "threads": threads,
        "workers": args.workers,
        "seconds_one_process": [round(s, 2) for s in seconds[1]],
        "seconds_workers": [round(s, 2) for s in seconds[args.workers]],
        "speedup": round(t1 / tn, 3),
        "max_relative_curve_difference": rel,
    }
    print(
        f"{result['units']} head curves: one process on {threads} threads {t1:.1f} s, {args.workers} workers of "
        f"1 thread {tn:.1f} s (medians of {args.rounds}): {t1 / tn:.3f}x; "
        f"curves agree to {rel:.1e} (relative)"
    )
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
