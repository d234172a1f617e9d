"""Decode steps of several caches interleaved one step at a time: per-head split layers against a per-layer
schedule of the same KV, and (with `--head-by-head`) split layers appending head by head instead of into their flat
buffers; with `--ones`, the all-ones schedule against stock `StaticCache` instead (the runtime's own overhead). A
step of each runs back to back, the order reversing every step, so a slow stretch of a noisy machine slows them
alike; the paired per-step ratio is what is compared. `--prefills N` also times N prefills of each, interleaved
the same way (after one untimed round), and compares them paired. Each run's minor page faults are counted
beside its time: on CPU a run that follows another can pay for the pages glibc gave back to the system
(`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736` keep them; the result records the MALLOC_ settings).

    python -m experiments.interleaved_steps [--heads schedules/smollm2-135m-instruct_b0.3.json] \\
        [--layers docs/per_layer_calibrated/smollm2-135m-instruct_b0.3.json] [--steps 128] [--head-by-head] \\
        [--out FILE]
    python -m experiments.interleaved_steps --ones --prefills 5 [--out FILE]

SmolLM2 (fp32, CPU), batch 8 x 2048-token prompts cut from ../shared/data/gutenberg as `calibrate bench` cuts
them; each cache is prefilled once (evict mode, as calibrated), then decoded greedily. Trim steps (every
`decode.interval`-th) are left out of the step statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import time

import torch

import runtime
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


STOCK = "stock StaticCache"


@contextlib.contextmanager
def running(model, config: tuple):
    """Inside: calls of `model` run as `config` (schedule or None for stock, head by head or not) says."""
    sched, hbh = config
    if sched is None:
        yield
        return
    with runtime.apply(model, sched), head_by_head(hbh):
        yield


def minor_faults() -> int:
    """The process's minor page faults so far: pages it touched for the first time since the system gave them."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def prefill(model, config: tuple, ids: torch.Tensor, steps: int):
    """(cache, next token, seconds, minor page faults) of one prefill under `config`; stock gets a StaticCache with
    room for `steps`."""
    from transformers import StaticCache

    cache = None if config[0] is not None else StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    with running(model, config), torch.inference_mode():
        faults, t = minor_faults(), time.perf_counter()
        out = model(ids, cache=cache, logits_to_keep=1)
        seconds, faults = time.perf_counter() - t, minor_faults() - faults
    return runtime.cache_of(out), out.logits[:, -1:].argmax(-1), seconds, faults


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="schedules/smollm2-135m-instruct_b0.3.json")
    p.add_argument("--layers", default="docs/per_layer_calibrated/smollm2-135m-instruct_b0.3.json")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--head-by-head", action="store_true", help="also the per-head schedule appending head by head")
    p.add_argument("--ones", action="store_true", help="the all-ones schedule against stock StaticCache instead")
    p.add_argument("--prefills", type=int, default=0, help="also time this many interleaved prefills of each")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.ones and args.head_by_head:
        p.error("--ones compares the all-ones schedule with stock; --head-by-head needs the per-head schedule")
    check_out(args.out)
    from calibrate.schedule_spec import resolve_schedule

    model, tok = load_model(None, "float32", "cpu")
    stream = data.token_stream(tok, data.load_texts([default_text()]))
    ids = data.cut_windows(stream, args.context, args.batch)
    if args.ones:
        configs = {"all-ones": (resolve_schedule("ones", model, args.context), False), STOCK: (None, False)}
        paths, baseline = {"all-ones": "ones", STOCK: None}, STOCK
    else:
        configs = {"per head": (load_schedule(args.heads), False), "per layer": (load_schedule(args.layers), False)}
        paths, baseline = {"per head": args.heads, "per layer": args.layers}, "per layer"
        if args.head_by_head:
            configs["per head, head by head"] = (configs["per head"][0], True)
            paths["per head, head by head"] = args.heads
    names = list(configs)
    prefills: dict[str, list[float]] = {n: [] for n in names}
    prefill_faults: dict[str, list[int]] = {n: [] for n in names}
    for r in range(args.prefills + 1 if args.prefills else 0):  # round 0 untimed: first calls pay lazy init
        for name in names if r % 2 == 0 else names[::-1]:
            seconds, faults = prefill(model, configs[name], ids, args.steps)[2:]
            if r:
                prefills[name].append(seconds)
                prefill_faults[name].append(faults)
        print(f"prefill round {r}/{args.prefills}", flush=True)
    state = {}
    for name in names:
        cache, nxt = prefill(model, configs[name], ids, args.steps)[:2]
        state[name] = {"cache": cache, "next": nxt, "times": [], "faults": 0}
        print(f"prefilled {name} ({paths[name] or 'stock'})", flush=True)
    for step in range(args.steps):
        for name in names if step % 2 == 0 else names[::-1]:
            s = state[name]
            with running(model, configs[name]), torch.inference_mode():
                faults, t = minor_faults(), time.perf_counter()
                out = model(s["next"], cache=s["cache"], logits_to_keep=1)
                s["times"].append(time.perf_counter() - t)
                s["faults"] += minor_faults() - faults
            s["next"] = out.logits[:, -1:].argmax(-1)
    interval = next(c[0] for c in configs.values() if c[0] is not None).decode.interval
    plain = {n: [t for i, t in enumerate(state[n]["times"]) if (i + 1) % interval != 0] for n in names}

    def paired(times: dict[str, list[float]], a: str, b: str) -> float:
        """Median over pairs of (b's time / a's): a's speed relative to b's."""
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b], strict=True))

    others = [n for n in names if n != baseline]
    vs = "per_layer" if baseline == "per layer" else "stock_static"
    result = {
        "batch": args.batch,
        "context": args.context,
        "steps": args.steps,
        "configs": paths,
        "plain_step_ms_median": {n: round(statistics.median(plain[n]) * 1e3, 2) for n in names},
        "kv_mib": {n: round(runtime.kv_bytes(state[n]["cache"]) / 2**20, 1) for n in names},
        "decode_minor_faults_per_step": {n: round(state[n]["faults"] / args.steps, 1) for n in names},
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
        f"speed_vs_{vs}": {n: round(paired(plain, n, baseline), 3) for n in others},
    }
    if args.ones:
        result["same_tokens"] = bool(torch.equal(state["all-ones"]["next"], state[STOCK]["next"]))
    if args.head_by_head:
        result["flat_vs_head_by_head"] = round(paired(plain, "per head", "per head, head by head"), 3)
    if args.prefills:
        result["prefills"] = args.prefills
        result["prefill_s_median"] = {n: round(statistics.median(prefills[n]), 3) for n in names}
        result["prefill_minor_faults_median"] = {n: statistics.median(prefill_faults[n]) for n in names}
        # median of (time / baseline's time) over the rounds: above 1 is slower
        result[f"prefill_time_vs_{vs}"] = {n: round(paired(prefills, baseline, n), 3) for n in others}
    print("| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    print("| plain step ms, median | " + " | ".join(f"{result['plain_step_ms_median'][n]:.1f}" for n in names) + " |")
    if args.prefills:
        print("| prefill s, median | " + " | ".join(f"{result['prefill_s_median'][n]:.2f}" for n in names) + " |")
        faults = result["prefill_minor_faults_median"]
        print("| prefill minor page faults, median | " + " | ".join(f"{faults[n]:.0f}" for n in names) + " |")
    faults = result["decode_minor_faults_per_step"]
    print("| decode minor page faults per step | " + " | ".join(f"{faults[n]:.1f}" for n in names) + " |")
    print("| KV MiB at end | " + " | ".join(f"{result['kv_mib'][n]:.1f}" for n in names) + " |")
    for n, r in result[f"speed_vs_{vs}"].items():
        print(f"{n}: decode speed {r:.3f}x {baseline}'s (median of paired per-step ratios)")
    for n, r in result.get(f"prefill_time_vs_{vs}", {}).items():
        print(f"{n}: prefill time {r:.3f}x {baseline}'s (median of paired ratios over {args.prefills} rounds)")
    if args.head_by_head:
        print(f"flat buffers: speed {result['flat_vs_head_by_head']:.3f}x head-by-head appends")
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
