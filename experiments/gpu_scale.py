"""The runtime at 8B scale on one GPU: correctness, one layer's decode step, end to end, the largest batch.

    python -m experiments.gpu_scale --out gpu_scale_h200.json                     # on the GPU (< 8 min, H200)
    python -m experiments.gpu_scale --shape tiny --device cpu --out /tmp/g.json   # dry run

An 8B-shaped Llama (hidden 4096, MLP 14336, 32 layers, 32 query / 8 KV heads, head dim 128, vocab 128256) with
seeded random weights in bf16 and random token ids: speed and memory do not depend on the weights. Every part is
written to --out as soon as it is measured, and a side-by-side table is printed at the end.

- a. correctness: the all-ones schedule against stock greedy on a left-padded batch (tokens equal, argmax
  agreement, max |logit diff| of the first token); under a per-head schedule, each row of the padded batch against
  that row alone; the same padded batch decoded with the Triton kernel against head by head (where Triton runs);
  the KV the per-head schedule keeps after prefill against its `kv_fraction`.
- b. one layer (a one-layer model of the same shape): a decode step with stock StaticCache at the full length,
  stock at the kept length (pre-cut), a per-layer uniform 0.3 schedule and a per-head 0.3 schedule, its layers
  attending head by head (`per_head`) and in one Triton launch (`per_head_kernel`, where Triton runs).
- c. end to end at each --cases BxT with --new-tokens: prefill seconds, plain and trim step times, decode
  tokens/s, KV bytes and peak memory for stock DynamicCache, stock StaticCache, the pre-cut reference, uniform 0.3
  and per-head 0.3 (seeded lognormal shares, rescaled to the budget), head by head and with the kernel. Each
  configuration is warmed once at the same shape (through its first trim) before its timed run.
- d. the largest batch that fits --memory-gib at the longest case (weights counted once): stock's measured peak
  per row; a schedule prefills in chunks of the case's batch (`runtime.prefill_rows`), so it needs that run's
  measured peak once plus its decode cache (KV and bookkeeping) for every further row.
- e. (only when asked: `--parts e`, which also runs c and d at the longest case) throughput there: stock
  StaticCache and the per-head schedule, each at its largest batch from d, decode and generation tokens/s (the
  paper's metric), the schedule prefilling in chunks of the case's batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from transformers import StaticCache
from transformers.cache_utils import DynamicCache

import runtime
import runtime.inspect
from calibrate import benchmark as bench
from runtime import ragged_decode
from runtime.reference import all_ones, rescale_to_budget, uniform
from runtime.schedule import Schedule, write_atomic

from . import check_out
from .shapes import SHAPES, build_model

PRESETS = {  # per shape: the end-to-end cases, new tokens, the correctness batch's longest prompt, layer bench
    "8b": dict(cases=["16x16384", "8x32768"], new_tokens=96, prompt=512, layer_case="16x16384", memory_gib=120),
    "tiny": dict(cases=["2x192", "1x384"], new_tokens=10, prompt=160, layer_case="2x192", memory_gib=1),
}
BUDGET = 0.3
INTERVAL = 8  # trim every 8 decode tokens, so that the runs have several trim steps
KERNEL = "per_head_kernel"  # the per-head schedule under runtime.apply(..., ragged_kernel=True)


def per_head_schedule(layers: int, heads: int, context: int, seed: int = 0) -> Schedule:
    """Seeded lognormal shares per KV head, rescaled by one factor to the budget at `context` tokens."""
    g = torch.Generator().manual_seed(seed)
    shares = torch.exp(0.7 * torch.randn(layers, heads, generator=g))
    shares = (shares / shares.mean() * BUDGET).clamp(0.01, 1.0).tolist()
    base = Schedule(ratios=[1.0] * layers, window=32, sinks=4).with_head_ratios(shares)
    return _with_interval(rescale_to_budget(base, BUDGET, context))


def _with_interval(schedule: Schedule) -> Schedule:
    return dataclasses.replace(schedule, decode=dataclasses.replace(schedule.decode, interval=INTERVAL))


def _ids(batch: int, length: int, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def _left_padded(lengths: list[int], vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(lengths)
    ids = _ids(len(lengths), n, vocab, device, seed=1)
    mask = torch.zeros_like(ids)
    for i, m in enumerate(lengths):
        mask[i, n - m :] = 1
    return ids.masked_fill(mask == 0, 0), mask


@torch.inference_mode()
def _first_logits(model, ids, mask, schedule: Schedule | None) -> torch.Tensor:
    pos = runtime.mask_positions(mask)
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    if schedule is None:
        return model(**kw, cache=DynamicCache(config=model.config)).logits[:, -1].float()
    with runtime.apply(model, schedule):
        return model(**kw).logits[:, -1].float()


def _greedy(model, ids, mask, new: int, schedule: Schedule | None, kernel: bool = False) -> torch.Tensor:
    out: list[torch.Tensor] = []
    if schedule is None:
        bench.greedy_run(model, ids, mask, new, DynamicCache(config=model.config), tokens_out=out)
    else:
        with runtime.apply(model, schedule, ragged_kernel=kernel):
            bench.greedy_run(model, ids, mask, new, tokens_out=out)
    return torch.cat(out, dim=1)


def correctness(model, preset: dict, device: str) -> dict:
    config = model.config
    n, layers = preset["prompt"], config.num_hidden_layers
    lengths = [n, 3 * n // 4, n // 2, n // 4]
    ids, mask = _left_padded(lengths, config.vocab_size, device)
    new = 16
    ones = _with_interval(all_ones(layers))
    stock_tokens, ones_tokens = _greedy(model, ids, mask, new, None), _greedy(model, ids, mask, new, ones)
    logit_diff = (_first_logits(model, ids, mask, None) - _first_logits(model, ids, mask, ones)).abs().max()
    heads = per_head_schedule(layers, config.num_key_value_heads, n)
    batch_tokens, batch_logits = _greedy(model, ids, mask, new, heads), _first_logits(model, ids, mask, heads)
    alone_equal, alone_diff = [], 0.0
    for i, m in enumerate(lengths):
        row, row_mask = ids[i : i + 1, n - m :], mask[i : i + 1, n - m :]
        alone_equal.append(float((_greedy(model, row, row_mask, new, heads) == batch_tokens[i]).float().mean()))
        alone_diff = max(alone_diff, float((_first_logits(model, row, row_mask, heads) - batch_logits[i]).abs().max()))
    # the KV a per-head schedule keeps after prefill, on an unpadded batch
    full = _ids(2, n, config.vocab_size, device, seed=2)
    with torch.inference_mode(), runtime.apply(model, heads):
        cache = model(full, use_cache=True, logits_to_keep=1).cache
        kept = sum(float(runtime.inspect.kept_per_row(cache, i).float().mean()) for i in range(layers)) / layers
        kv = runtime.kv_bytes(cache)
    full_kv = 2 * 2 * layers * config.num_key_value_heads * config.head_dim * n * model.dtype.itemsize
    kernel = {}
    if kernel_available(device):  # the one-launch decode of split layers against the per-head path, padded batch
        tokens = _greedy(model, ids, mask, new, heads, kernel=True)
        kernel = {"kernel_tokens_equal": int((tokens == batch_tokens).sum()), "kernel_tokens": tokens.numel()}
    return {
        **kernel,
        "prompt_lengths": lengths,
        "new_tokens": new,
        "all_ones_tokens_equal": int((stock_tokens == ones_tokens).sum()),
        "all_ones_tokens": stock_tokens.numel(),
        "all_ones_first_logits_max_abs_diff": float(logit_diff),
        "per_head_row_alone_token_agreement": alone_equal,
        "per_head_row_alone_first_logits_max_abs_diff": alone_diff,
        "per_head_kept_fraction": kept / n,
        "per_head_schedule_kv_fraction": heads.kv_fraction(n),
        "per_head_kv_bytes_over_full": kv / full_kv,  # spare room for the decode tokens included
    }


def _case(text: str) -> tuple[int, int]:
    b, t = text.lower().split("x")
    return int(b), int(t)


def kernel_available(device: str) -> bool:
    """Whether `runtime.apply(..., ragged_kernel=True)` can run here: Triton on CUDA, or its CPU interpreter."""
    return ragged_decode.unavailable(torch.device(device)) is None


def _configs(model, prompt: int, device: str) -> dict[str, Schedule | None]:
    config = model.config
    layers = config.num_hidden_layers
    schedules = {
        "uniform": _with_interval(rescale_to_budget(uniform(layers, BUDGET), BUDGET, prompt)),
        "per_head": per_head_schedule(layers, config.num_key_value_heads, prompt),
    }
    if kernel_available(device):  # the same per-head schedule, its split layers decoded in one launch each
        schedules[KERNEL] = schedules["per_head"]
    return schedules


def _run(model, name: str, schedules: dict, ids, mask, new: int) -> bench.RunStats:
    """One greedy run of configuration `name`: stock_dynamic, stock_static, precut, or a schedule's name."""
    config = model.config
    if name in schedules:
        with runtime.apply(model, schedules[name], ragged_kernel=name == KERNEL):
            return bench.greedy_run(model, ids, mask, new, schedule=schedules[name])
    if name == "precut":
        ids, mask = bench.precut_inputs(ids, mask, schedules["uniform"])
    if name == "stock_dynamic":
        return bench.greedy_run(model, ids, mask, new, DynamicCache(config=config))
    return bench.greedy_run(model, ids, mask, new, StaticCache(config=config, max_cache_len=ids.shape[1] + new - 1))


def end_to_end(model, case: str, new: int, device: str, warm: bool = True) -> dict:
    b, t = _case(case)
    ids = _ids(b, t, model.config.vocab_size, device, seed=3)
    mask = torch.ones_like(ids)
    schedules = _configs(model, t, device)
    out = {}
    for name in ("stock_dynamic", "stock_static", "precut", *schedules):
        if warm:  # the same shape, through the first trim: lazy init and the allocator's first growth untimed
            _run(model, name, schedules, ids, mask, INTERVAL + 2)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        out[name] = dataclasses.asdict(_run(model, name, schedules, ids, mask, new))
    return {"batch": b, "prompt_tokens": t, "new_tokens": new, "configs": out}


def largest_batch(case: dict, weights_bytes: int, limit_bytes: int, chunked: set[str] = frozenset()) -> dict[str, int]:
    """Rows that fit `limit_bytes` besides the weights. A configuration needs its measured peak per row; one in
    `chunked` prefills `case["batch"]` rows at a time, so it needs the measured run's peak once (its prefill and
    its KV) and then only its decode cache per further row: its peak KV, scaled by what the cache's bookkeeping
    (slot positions, validity, recent queries) adds to its KV (a layer is merged from its chunks one at a time)."""
    free = max(limit_bytes - weights_bytes, 0)
    rows = {}
    for name, r in case["configs"].items():
        peak = max(r["peak_memory_bytes"], r["kv_bytes_peak"])
        if name in chunked and peak <= free:
            kv_row = r["kv_bytes_peak"] / case["batch"] * max(r["cache_bytes_end"] / max(r["kv_bytes_end"], 1), 1.0)
            rows[name] = case["batch"] + int((free - peak) // max(kv_row, 1))
        else:  # (a chunked run that does not fit even once: as unchunked, smaller chunks would be needed)
            rows[name] = int(free // max(peak / case["batch"], 1))
    return rows


def throughput(model, case: str, rows: dict[str, int], new: int, device: str, free: int) -> dict:
    """Part e: stock StaticCache and the per-head schedule, each at its own largest batch (`rows`, sized for
    `free` bytes), the schedule prefilling the case's batch of rows at a time."""
    b, t = _case(case)
    schedule = _configs(model, t, device)["per_head"]  # the schedule part d sized
    batch_rows = {"stock_static": rows["stock_static"], "schedule": rows["per_head"]}

    def prompts(n: int):
        ids = _ids(n, t, model.config.vocab_size, device, seed=5)
        return ids, torch.ones_like(ids)

    for name, n in batch_rows.items():
        if n < 1:
            raise SystemExit(f"error: part e: {name} fits no row in {free / 2**30:.1f} GiB; raise --memory-gib")
    out = bench.throughput_at_largest(model, prompts, schedule, batch_rows, new, prefill_rows=b)
    # whether each measured peak fits the memory the batch was sized for (the weights' share aside)
    out["peak_fits"] = {n: c["peak_memory_bytes"] <= free for n, c in out["configs"].items()}
    return out


ROWS = [  # the end-to-end table: label, RunStats field, scale
    ("prefill s", "prefill_s", 1),
    ("decode tok/s", "decode_tokens_per_s", 1),
    ("plain step ms", "plain_step_ms_mean", 1),
    ("trim step ms", "trim_step_ms_mean", 1),
    ("KV GiB after prefill", "kv_bytes_prefill", 2**-30),
    ("peak GiB", "peak_memory_bytes", 2**-30),
]


def table(result: dict) -> str:
    lines = []
    for key, case in result["parts"].get("end_to_end", {}).items():
        names = list(case["configs"])
        lines += [f"end to end {key}, {case['new_tokens']} new tokens", "| metric | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]  # fmt: skip
        for label, field, scale in ROWS:
            cells = [case["configs"][n][field] for n in names]
            lines.append(f"| {label} | " + " | ".join("-" if c is None else f"{c * scale:.3g}" for c in cells) + " |")
        lines.append("")
    if "layer" in result["parts"]:
        layer = result["parts"]["layer"]["configs"]
        lines.append("one layer, plain decode step ms: " + ", ".join(
            f"{n} {r['plain_step_ms_mean']:.3g}" for n, r in layer.items()))  # fmt: skip
    if "largest_batch" in result["parts"]:
        rows = result["parts"]["largest_batch"]["rows"]
        lines.append("largest batch: " + ", ".join(f"{n} {v}" for n, v in rows.items()))
    if "throughput" in result["parts"]:
        lines += ["", bench.format_throughput(result["parts"]["throughput"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--cases", nargs="+", help="end-to-end BATCHxPROMPT cases (default: the shape's preset)")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--memory-gib", type=float, help="memory the largest batch must fit (8b: 120)")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["a", "b", "c", "d"],
        choices=["a", "b", "c", "d", "e"],
        help="default a b c d; e (throughput at the largest batch) also runs c and d at the longest case",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    check_out(args.out)
    preset = dict(PRESETS[args.shape])
    cases = args.cases or preset["cases"]
    new = args.new_tokens or preset["new_tokens"]
    for case in cases:
        try:
            _case(case)
        except ValueError:
            p.error(f"--cases: '{case}' is not BATCHxPROMPT, e.g. 16x16384")
    result: dict = {"shape": args.shape, **SHAPES[args.shape], "device": args.device, "dtype": args.dtype,
                    "budget": BUDGET, "trim_interval": INTERVAL, "parts": {}}  # fmt: skip
    if args.device.startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name()

    def record(name: str, value) -> None:
        result["parts"][name] = value
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
        print(name, "written", flush=True)

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if "b" in args.parts:  # a one-layer model first: the 8B one then has the memory to itself
        layer_model = build_model(args.shape, dtype, args.device, num_hidden_layers=1, vocab_size=1024)
        record("layer", end_to_end(layer_model, preset["layer_case"], 16, args.device))
        del layer_model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    model = build_model(args.shape, dtype, args.device)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    if "a" in args.parts:
        record("correctness", correctness(model, preset, args.device))
    biggest = max(cases, key=lambda c: _case(c)[1])
    if "e" in args.parts and "c" not in args.parts:
        cases = [biggest]  # d and e need only the longest case measured
    if {"c", "d", "e"} & set(args.parts):
        e2e = {}
        for case in cases:
            e2e[case] = end_to_end(model, case, new, args.device)
            record("end_to_end", e2e)
        if {"d", "e"} & set(args.parts):
            limit = int((args.memory_gib or preset["memory_gib"]) * 2**30)
            chunked = set(_configs(model, _case(biggest)[1], args.device))
            rows = largest_batch(e2e[biggest], weights, limit, chunked)
            record("largest_batch", {"case": biggest, "memory_bytes": limit, "weights_bytes": weights, "rows": rows,
                                     "chunked_prefill": sorted(chunked)})  # fmt: skip
            if "e" in args.parts:
                record("throughput", throughput(model, biggest, rows, new, args.device, limit - weights))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
