"""The runtime on a GPU: token-for-token equality with stock, agreement with the CPU, speed and KV memory.

    python -m experiments.cuda_check --schedule schedules/smollm2-135m-instruct_b0.3.json \\
        --data ../shared/data/gutenberg/pg1342_pride_and_prejudice.txt --out cuda_check.json
    python -m experiments.cuda_check --model DIR --random-init ...   # DIR holds config and tokenizer only

1. All-ones schedule against the stock model, greedy, a left-padded batch of prompts of different lengths, in
   float32 and bfloat16 on CUDA: every generated token must be the same.
2. The compressed schedule on CUDA against the same on CPU (float32, same weights): tokens kept per layer after
   prefill (overlap of the kept position sets), the first token's logits, and the greedy tokens.
3. `calibrate bench` figures on CUDA (stock and schedule alternating in one run), at a few batch sizes and dtypes.

--random-init builds the model from DIR's config with seeded random weights: for a GPU machine that cannot take
the weights along. Everything above is mechanics (equality, agreement, speed, memory) and holds for any weights;
quality is measured elsewhere (paired_kl, eval) with the real ones.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

import runtime
import runtime.inspect
from calibrate import benchmark as bench
from calibrate import data
from calibrate.models import load_model
from calibrate.schedule_spec import resolve_schedule
from runtime.schedule import write_atomic

from . import check_out

BENCHES = (  # schedule ("schedule": the one given; KIND:BUDGET runs in drop mode, as `calibrate bench`), dtype, ...
    ("schedule", "bfloat16", 8, 2048),
    ("ones", "bfloat16", 8, 2048),
    ("pyramidkv:0.3", "bfloat16", 8, 2048),
    ("schedule", "float32", 8, 2048),
    ("schedule", "bfloat16", 32, 4096),
    ("schedule", "bfloat16", 16, 8128),  # SmolLM2's longest: 8128 + 64 new tokens = 8192 positions
)


def _model(args):
    if not args.random_init:
        return load_model(args.model, "float32", "cpu")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(args.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    return model, tok


@torch.inference_mode()
def greedy(model, ids, mask, new_tokens: int, cache=None) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Greedy tokens [B, new_tokens], the first step's logits [B, V] and the cache after prefill's trim."""
    pos = runtime.mask_positions(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
    first, cache = out.logits[:, -1].float(), runtime.cache_of(out)
    kept = []  # per layer, or per KV head where shares differ; nothing for a stock cache
    if isinstance(cache, runtime.PyramidCache):
        for i in range(len(cache.layers)):
            kept += [(u.positions.clone(), u.valid.clone()) for u in runtime.inspect.kept(cache, i)]
    tokens = [first.argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tokens[-1], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1), first, kept


def padded_prompts(stream: torch.Tensor, lengths: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths cut from consecutive parts of the stream."""
    width, rows, masks, at = max(lengths), [], [], 0
    for n in lengths:
        row = torch.full((width,), pad_id, dtype=torch.long)
        row[width - n :] = stream[at : at + n]
        m = torch.zeros(width, dtype=torch.long)
        m[width - n :] = 1
        rows.append(row), masks.append(m)
        at += n
    return torch.stack(rows), torch.stack(masks)


def ones_equal_stock(model, ones, ids, mask, new_tokens) -> dict:
    stock, _, _ = greedy(model, ids, mask, new_tokens, DynamicCache(config=model.config))
    with runtime.apply(model, ones):
        ours, _, _ = greedy(model, ids, mask, new_tokens)
    return {"tokens": stock.numel(), "different": int((stock != ours).sum()), "equal": bool(torch.equal(stock, ours))}


def overlap(a: list, b: list) -> list[float]:
    """Per layer: kept (position, head, row) entries both devices chose / entries either chose."""
    shares = []
    for (pa, va), (pb, vb) in zip(a, b, strict=True):
        sa = set(_entries(pa, va))
        sb = set(_entries(pb, vb))
        shares.append(len(sa & sb) / max(len(sa | sb), 1))
    return shares


def _entries(pos, valid):
    pos, valid = pos.cpu(), valid.cpu().expand_as(pos)
    rows, heads, slots = valid.nonzero(as_tuple=True)
    return zip(rows.tolist(), heads.tolist(), pos[rows, heads, slots].tolist())


def cpu_agreement(model_cpu, model_gpu, schedule, ids, mask, new_tokens) -> dict:
    runs = {}
    for name, m in (("cpu", model_cpu), ("cuda", model_gpu)):
        dev = next(m.parameters()).device
        with runtime.apply(m, schedule):
            t0 = time.perf_counter()
            tokens, first, kept = greedy(m, ids.to(dev), mask.to(dev), new_tokens)
            runs[name] = (tokens.cpu(), first.cpu(), kept, time.perf_counter() - t0)
    (tc, fc, kc, sc), (tg, fg, kg, sg) = runs["cpu"], runs["cuda"]
    shares = overlap(kc, kg)
    same = (tc == tg).long().cumprod(-1).sum(-1)  # tokens equal before the first difference, per row
    return {
        "kept_overlap_min": min(shares),
        "kept_overlap_mean": sum(shares) / len(shares),
        "first_logits_max_abs_diff": float((fc - fg).abs().max()),
        "first_logits_std": float(fc.std()),
        "first_token_equal": bool(torch.equal(tc[:, 0], tg[:, 0])),
        "tokens_equal_before_first_difference": same.tolist(),
        "new_tokens": new_tokens,
        "seconds": {"cpu": sc, "cuda": sg},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder, .gguf or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--random-init", action="store_true", help="seeded random weights from the folder's config")
    p.add_argument("--schedule", default="schedules/smollm2-135m-instruct_b0.3.json")
    p.add_argument("--data", nargs="+", help="text files or folders (default: ../shared/data/gutenberg)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--benches", type=int, nargs="*", help="indices of the bench settings to run (default: all; none: no bench)"
    )
    p.add_argument("--prompt-tokens", type=int, default=1024, help="longest prompt of the padded batch")
    p.add_argument("--device", default="cuda", help="cuda (cpu only to try the script itself)")
    p.add_argument("--out", help="also write the results as JSON")
    args = p.parse_args(argv)
    check_out(args.out)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("cuda_check: no CUDA device here; run it on a machine with a GPU (or --device cpu)")
    dev = torch.device(args.device)
    from calibrate.commands.bench import default_text, device_name

    model_cpu, tok = _model(args)
    # plain reads: the GPU machine may lack `datasets`, which data.load_texts uses
    specs = [Path(s) for s in args.data or [default_text()]]
    files = [f for s in specs for f in (data.files_in(s) if s.is_dir() else [s])]
    stream = data.token_stream(tok, [data.strip_gutenberg(f.read_text(encoding="utf-8")) for f in files])
    schedule = resolve_schedule(args.schedule, model_cpu, 2048)
    ones = resolve_schedule("ones", model_cpu, 2048)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n = args.prompt_tokens
    ids, mask = padded_prompts(stream, [n, n * 2 // 3, n, n // 3], pad)
    result = {"device_name": device_name(dev), "torch": torch.__version__}
    import transformers

    result["transformers"] = transformers.__version__
    result["random_init"] = args.random_init
    result["schedule"] = schedule.name or args.schedule

    def save() -> None:  # after every part, so a run cut short still leaves what it measured
        if args.out:
            write_atomic(args.out, json.dumps(result, indent=2) + "\n")

    def on_device(dtype: str):  # a fresh copy each time: a round trip through bfloat16 would round the weights
        return copy.deepcopy(model_cpu).to(device=dev, dtype=getattr(torch, dtype))

    model = on_device("float32")
    result["cpu_agreement_float32"] = r = cpu_agreement(model_cpu, model, schedule, ids, mask, args.new_tokens // 2)
    print(
        f"{result['schedule']} {dev.type} vs CPU, float32: kept-token overlap min {r['kept_overlap_min']:.4f} mean "
        f"{r['kept_overlap_mean']:.4f}; first logits max |diff| {r['first_logits_max_abs_diff']:.2e} (std "
        f"{r['first_logits_std']:.2f}); equal tokens before the first difference "
        f"{r['tokens_equal_before_first_difference']}",
        flush=True,
    )
    save()
    for dtype in ("float32", "bfloat16"):
        model = on_device(dtype)
        r = ones_equal_stock(model, ones, ids.to(dev), mask.to(dev), args.new_tokens)
        result[f"ones_equal_stock_{dtype}"] = r
        print(f"all-ones vs stock, {dtype}, {dev.type}: {r['different']} of {r['tokens']} tokens differ", flush=True)
        save()
    result["bench"] = []
    picked = range(len(BENCHES)) if args.benches is None else args.benches
    for which, dtype, batch, context in (BENCHES[i] for i in picked):
        model = on_device(dtype)
        sched = resolve_schedule(args.schedule if which == "schedule" else which, model, context)
        if ":" in which:
            sched = dataclasses.replace(sched, prefill_mode="drop")
        windows = data.cut_windows(stream, context, batch).to(dev)
        print(f"\nbench: {sched.name or which}, {dtype}, batch {batch}, {context} tokens, {args.new_tokens} new")
        r = bench.compare(model, windows, torch.ones_like(windows), sched, args.new_tokens, args.repeats)
        r.update(schedule_name=sched.name or which, prefill_mode=sched.prefill_mode, dtype=dtype)
        r.update(kv_fraction=sched.kv_fraction(context))
        print(bench.format_table(r), flush=True)
        result["bench"].append(r)
        save()


if __name__ == "__main__":
    main()
