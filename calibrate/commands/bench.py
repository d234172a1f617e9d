"""`calibrate bench`: a schedule against stock DynamicCache, stock StaticCache and a pre-cut reference, side by side
in one run: prefill, decode speed (plain and trim steps apart), KV bytes, memory, largest batch."""

from __future__ import annotations

import argparse
import json

ORDER = 40

EXAMPLES = """\
examples:
  calibrate bench                                    # SmolLM2, pyramidkv:0.3 drop mode, batch 8, 2048 tokens
  calibrate bench --schedule schedules/smollm2-135m-instruct_b0.3.json --dtype bfloat16
  calibrate bench --schedule ones --repeats 3        # the all-ones schedule must run at stock speed
  calibrate bench --schedule schedules/smollm2-135m-instruct_b0.3.json \
      --against docs/per_layer_calibrated/smollm2-135m-instruct_b0.3.json   # per head against per layer
  calibrate bench --batch 4 --context 1024 --new-tokens 32 --out bench.json
  calibrate bench --schedule schedules/smollm2-135m-instruct_b0.3.json --throughput   # each at its largest batch
  calibrate bench --schedule schedules/smollm2-135m-instruct_b0.3.json --throughput --prefill-rows 8
                                                     # the schedule prefills 8 rows at a time (its prefill's
                                                     # activations and scoring buffers: 8 rows' worth)
  calibrate bench --device cuda --dtype bfloat16 --kv-limit-mb 2048

Four configurations (five with --against), each warmed before timing, run in turn (the order reverses every
other repeat); each figure is the median over --repeats, and only the ratios, measured side by side in the same
run, are meant to be compared:
  stock DynamicCache   transformers' default cache; its torch.cat append re-copies the cache every token, so the
                       schedule's ratio against it overstates what compression gives
  stock StaticCache    preallocated cache: the honest baseline
  pre-cut reference    stock model and StaticCache on only the last round(KV fraction x --context) prompt tokens:
                       the limit of what compression can give at the schedule's KV share
  schedule             the model under runtime.apply
  --against schedule   a second schedule under runtime.apply, another baseline for the first
Decode steps are timed one by one; trim steps (every decode.interval tokens after prefill, when the schedule
re-scores and trims) are reported apart from plain steps. The largest batch is the KV-memory limit divided by
the measured peak KV bytes per row (default limit: what stock DynamicCache needs at --batch). --throughput then
runs stock StaticCache and the schedule again, each at its own largest batch, and reports decode and generation
(prefill included) tokens/s there: what a server with that much KV memory serves per second.
"""


def add_parser(subparsers):
    from ..options import DEVICE_MAP_HELP

    p = subparsers.add_parser(
        "bench",
        help="a schedule against stock Dynamic/StaticCache and a pre-cut reference: speed, KV bytes, memory, batch",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="hub id, model folder or .gguf file (default: the embedded SmolLM2-135M)")
    p.add_argument("--schedule", default="pyramidkv:0.3", help="schedule file or KIND:BUDGET (default pyramidkv:0.3)")
    p.add_argument("--against", metavar="SCHEDULE",
                   help="a second schedule (file or KIND:BUDGET) measured in the same run, e.g. a per-layer one at the "
                        "same KV fraction")  # fmt: skip
    p.add_argument("--mode", choices=["evict", "drop"], help="override the schedule's prefill mode (reference: drop)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--device-map", help=DEVICE_MAP_HELP)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row, at least 2 (default 64)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--kv-limit-mb", type=float, help="KV memory limit for the largest-batch figure")
    p.add_argument("--prefill-rows", type=int, metavar="N",
                   help="the schedule (and --against) prefill N rows at a time (runtime.prefill_rows): the "
                        "prefill's activations, full-length layer KV and scoring buffers are N rows' worth; default: "
                        "the whole batch at once")  # fmt: skip
    p.add_argument("--throughput", action="store_true",
                   help="also run stock StaticCache and the schedule at their largest batches in the KV limit and "
                        "compare tokens/s there (--repeats runs each)")  # fmt: skip
    p.add_argument("--data", nargs="+", help="text to cut prompts from (default: ../shared/data/gutenberg)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import dataclasses
    from pathlib import Path

    from runtime.families import check_schedule_fits
    from runtime.schedule import ScheduleError, write_atomic

    from .. import benchmark as bench
    from .. import data
    from ..models import load_model
    from ..schedule_spec import resolve_schedule
    from ..settings import check_positions

    for name, least in (("batch", 1), ("context", 1), ("new_tokens", 2), ("repeats", 1), ("prefill_rows", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            raise ScheduleError(f"{flag} {value}: must be at least {least}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, args.dtype, args.device, args.device_map)
    check_positions(model, args.context + args.new_tokens, f"--context {args.context} + --new-tokens "
                    f"{args.new_tokens}", "use a shorter --context")  # fmt: skip

    def resolved(flag: str, spec: str):
        """The schedule `spec` names, checked against the model before any run (errors name the flag)."""
        try:
            out = resolve_schedule(spec, model, args.context)
            check_schedule_fits(model, out)
        except ScheduleError as e:
            raise ScheduleError(f"{flag} {spec}: {e}") from None
        if args.mode or ":" in spec:
            out = dataclasses.replace(out, prefill_mode=args.mode or "drop")
        return out

    schedule = resolved("--schedule", args.schedule)
    other = resolved("--against", args.against) if args.against else None
    sources = args.data or [default_text()]
    stream = data.token_stream(tok, data.load_texts(sources))
    ids = data.cut_windows(stream, args.context, args.batch).to(model.device)
    mask = torch_ones(ids)
    print(
        f"model {model.config.model_type} {args.dtype} on {model.device}; schedule {schedule.name or args.schedule} "
        f"({schedule.prefill_mode}, KV fraction {schedule.kv_fraction(args.context):.3f} at {args.context} tokens); "
        f"batch {ids.shape[0]}, {args.new_tokens} new tokens; pre-cut reference on the last "
        f"{bench.precut_tokens(schedule, args.context)} tokens"
    )
    result = bench.compare(
        model,
        ids,
        mask,
        schedule,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        kv_limit_bytes=int(args.kv_limit_mb * 2**20) if args.kv_limit_mb else None,
        progress=lambda msg: print("  " + msg, flush=True),
        other=other,
        prefill_rows=args.prefill_rows,
    )
    result.update(
        model=str(args.model or "SmolLM2-135M-Instruct"),
        dtype=args.dtype,
        device=str(model.device),
        device_name=device_name(model.device),
        schedule_name=schedule.name or args.schedule,
        prefill_mode=schedule.prefill_mode,
        kv_fraction=schedule.kv_fraction(args.context),
    )
    if args.throughput:

        def prompts(rows: int):
            ids = data.cut_windows(stream, args.context, rows).to(model.device)
            return ids, torch_ones(ids)

        try:
            result["throughput"] = bench.throughput_at_largest(
                model, prompts, schedule, result["largest_batch"], args.new_tokens, args.repeats,
                progress=lambda msg: print("  " + msg, flush=True), prefill_rows=args.prefill_rows,
            )  # fmt: skip
        except bench.ThroughputInputError as e:  # what the user can change: the text, the prompt length, the limit
            raise ScheduleError(f"--throughput: {e}") from None
    if other is not None:
        result.update(against_name=other.name or args.against, against_prefill_mode=other.prefill_mode,
                      against_kv_fraction=other.kv_fraction(args.context))  # fmt: skip
    print(bench.format_table(result))
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


def torch_ones(ids):
    import torch

    return torch.ones_like(ids)


def default_text() -> str:
    from ..paths import shared_data

    folder = shared_data() / "gutenberg"
    if not folder.is_dir():
        from ..errors import CalibrateError

        raise CalibrateError(f"no default text at {folder}; pass --data with a text file")
    return str(folder)


def device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
