"""Decode steps of several caches interleaved one step at a time: per-head split layers against a per-layer
schedule of the same KV, and (with `--head-by-head`) split layers appending head by head instead of into their flat
buffers. A step of each runs back to back, the order reversing every step, so a slow stretch of a noisy machine
slows them alike; the paired per-step ratio is what is compared.

    python -m experiments.interleaved_steps [--heads schedules/smollm2-135m-instruct_b0.3.json] \\
        [--layers docs/per_layer_calibrated/smollm2-135m-instruct_b0.3.json] [--steps 128] [--head-by-head] \\
        [--out FILE]

SmolLM2 (fp32, CPU), batch 8 x 2048-token prompts cut from ../shared/data/gutenberg as `calibrate bench` cuts
them; each cache is prefilled once (evict mode, as calibrated), then decoded greedily. Trim steps (every
`decode.interval`-th) are left out of the step statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from calibrate import data
from calibrate.commands.bench import default_text
from calibrate.models import load_model
from runtime.schedule import load_schedule, write_atomic

from . import check_out


@contextlib.contextmanager
def head_by_head(on: bool):
    """Split layers append head by head (`RaggedLayer.flat` off: the simple path the tests compare with)."""
    from runtime.ragged_layer import RaggedLayer

    before = RaggedLayer.flat
    RaggedLayer.flat = not on
    try:
        yield
    finally:
        RaggedLayer.flat = before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="schedules/smollm2-135m-instruct_b0.3.json")
    p.add_argument("--layers", default="docs/per_layer_calibrated/smollm2-135m-instruct_b0.3.json")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--head-by-head", action="store_true", help="also the per-head schedule appending head by head")
    p.add_argument("--out")
    args = p.parse_args(argv)
    check_out(args.out)
    import runtime

    model, tok = load_model(None, "float32", "cpu")
    stream = data.token_stream(tok, data.load_texts([default_text()]))
    ids = data.cut_windows(stream, args.context, args.batch)
    configs = {"per head": (args.heads, False), "per layer": (args.layers, False)}
    if args.head_by_head:
        configs["per head, head by head"] = (args.heads, True)
    state = {}
    for name, (path, hbh) in configs.items():
        sched = load_schedule(path)
        with runtime.apply(model, sched), head_by_head(hbh), torch.inference_mode():
            out = model(ids, logits_to_keep=1)
        state[name] = {"schedule": sched, "cache": out.past_key_values, "next": out.logits[:, -1:].argmax(-1)}
        state[name]["times"] = []
        print(f"prefilled {name} ({path})", flush=True)
    names = list(configs)
    for step in range(args.steps):
        for name in names if step % 2 == 0 else names[::-1]:
            s = state[name]
            with runtime.apply(model, s["schedule"]), head_by_head(configs[name][1]), torch.inference_mode():
                t = time.perf_counter()
                out = model(s["next"], cache=s["cache"], logits_to_keep=1)
                s["times"].append(time.perf_counter() - t)
            s["next"] = out.logits[:, -1:].argmax(-1)
    interval = state["per head"]["schedule"].decode.interval
    plain = {n: [t for i, t in enumerate(state[n]["times"]) if (i + 1) % interval != 0] for n in names}

    def paired(a: str, b: str) -> float:
        """Median over plain steps of (b's step time / a's): a's speed relative to b's."""
        return statistics.median(tb / ta for ta, tb in zip(plain[a], plain[b], strict=True))

    result = {
        "batch": args.batch,
        "context": args.context,
        "steps": args.steps,
        "configs": {n: configs[n][0] for n in names},
        "plain_step_ms_median": {n: round(statistics.median(plain[n]) * 1e3, 2) for n in names},
        "kv_mib": {n: round(runtime.kv_bytes(state[n]["cache"]) / 2**20, 1) for n in names},
        "speed_vs_per_layer": {n: round(paired(n, "per layer"), 3) for n in names if n != "per layer"},
    }
    if args.head_by_head:
        result["flat_vs_head_by_head"] = round(paired("per head", "per head, head by head"), 3)
    print("| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    print("| plain step ms, median | " + " | ".join(f"{result['plain_step_ms_median'][n]:.1f}" for n in names) + " |")
    print("| KV MiB at end | " + " | ".join(f"{result['kv_mib'][n]:.1f}" for n in names) + " |")
    for n, r in result["speed_vs_per_layer"].items():
        print(f"{n}: speed {r:.3f}x the per-layer schedule's (median of paired per-step ratios)")
    if args.head_by_head:
        print(f"flat buffers: speed {result['flat_vs_head_by_head']:.3f}x head-by-head appends")
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
