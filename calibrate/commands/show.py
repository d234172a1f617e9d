"""`calibrate show`: print a schedule as a per-layer table with its mean KV fraction."""

from __future__ import annotations

import argparse
import sys

ORDER = 90

EXAMPLES = """\
examples:
  calibrate show schedules/smollm2-135m-instruct_b0.3.json
  calibrate show schedules/smollm2-135m-instruct_b0.3.json --tokens 4096
  calibrate show --reference uniform --budget 0.3 --layers 30
  calibrate show --reference pyramidkv --budget 0.3 --layers 30 --beta 20
  calibrate show --reference pyramidinfer --budget 0.5 --layers 18 --tokens 4096 --save /tmp/pi.json
  calibrate show --reference all_ones --layers 30

The table lists, per layer, the retention ratio (share of the context kept, sinks and recent window excluded),
the tokens kept after a prompt of --tokens tokens, and that as a share of the full cache (KV) with a bar.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "show",
        help="print a schedule (file or reference) as a per-layer table",
        description="Print a schedule file, or a reference schedule, as a per-layer table with its mean KV fraction.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("schedule", nargs="?", metavar="SCHEDULE", help="schedule file (JSON) to show")
    ref = p.add_argument_group("reference schedule (instead of SCHEDULE)")
    ref.add_argument("--reference", metavar="KIND", help="uniform, pyramidkv, pyramidinfer or all_ones")
    ref.add_argument("--budget", type=float, help="mean KV fraction in (0, 1] at --tokens prompt tokens")
    ref.add_argument("--layers", type=int, default=30, help="number of layers (default: 30, SmolLM2-135M)")
    ref.add_argument("--sinks", type=int, default=4, help="first tokens always kept (default: 4)")
    ref.add_argument("--window", type=int, default=32, help="recent tokens always kept (default: 32)")
    ref.add_argument("--beta", type=float, default=20, help="pyramidkv: max/min spread (default: 20)")
    ref.add_argument("--r", type=float, default=0.9, help="pyramidinfer: cosine floor r (default: 0.9)")
    ref.add_argument("--save", metavar="PATH", help="also write the reference schedule to PATH (JSON)")
    p.add_argument(
        "--tokens",
        type=int,
        help="prompt length for the table (default: the schedule's context_length; 2048 for references)",
    )
    p.set_defaults(func=run)
    return p


def _reference(args: argparse.Namespace):
    from runtime.reference import at_budget
    from runtime.schedule import ScheduleError

    kind = args.reference.lower().replace("-", "_")
    extra = {"beta": args.beta} if kind == "pyramidkv" else {"r": args.r} if kind == "pyramidinfer" else {}
    tokens = args.tokens if args.tokens is not None else 2048
    if tokens < 1:
        raise ScheduleError(f"--tokens {tokens} is not a positive number of prompt tokens; use e.g. 2048")
    return at_budget(
        kind, args.layers, args.budget, prompt_tokens=tokens, sinks=args.sinks, window=args.window, **extra
    )


def _bar(fraction: float, width: int, blocks: str) -> str:
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return blocks[-1] * full + (blocks[part] if part else "")


def _blocks() -> str:
    """Eighth-block characters when the terminal can print them, else ASCII."""
    blocks = " ▏▎▍▌▋▊▉█"
    try:
        blocks.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "        #"
    return blocks


def render(schedule, tokens: int, width: int = 40) -> str:
    """The table `calibrate show` prints."""
    kept = schedule.kept_tokens(tokens)
    compressible = schedule.compressible()
    blocks = _blocks()
    lines = []
    title = schedule.name or "(unnamed schedule)"
    lines.append(f"schedule: {title}")
    settings = f"{schedule.num_layers} layers, sinks {schedule.sinks}, window {schedule.window}"
    settings += f", prefill {schedule.prefill_mode}"
    lines.append(f"settings: {settings}")
    if schedule.model is not None:
        lines.append(f"model: {schedule.model.name} (fingerprint {schedule.model.fingerprint})")
    if schedule.budget is not None:
        lines.append(f"budget: {schedule.budget:g} mean KV fraction at {schedule.context_length} prompt tokens")
    lines.append("")
    lines.append(f"{'layer':>5}  {'ratio':>6}  {'kept':>7}  {'KV':>6}  tokens kept of {tokens}")
    for layer, (ratio, k, c) in enumerate(zip(schedule.ratios, kept, compressible)):
        frac = k / tokens
        ratio_text = f"{ratio:6.4f}" if c else "  full"
        note = "" if c else "  (not compressed)"
        heads = schedule.layer_head_ratios(layer) if c else None
        if heads is not None:  # ratio and kept are then the mean over the layer's KV heads
            note = "  heads " + "/".join(f"{r:.2f}" for r in heads)
        lines.append(f"{layer:>5}  {ratio_text}  {k:>7}  {frac:6.1%}  {_bar(frac, width, blocks)}{note}")
    n_comp = sum(compressible)
    lines.append("")
    lines.append(
        f"mean KV fraction at {tokens} prompt tokens: {schedule.kv_fraction(tokens):.4f} "
        f"({n_comp} compressible layer{'s' if n_comp != 1 else ''})"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from runtime.schedule import ScheduleError, load_schedule

    if args.schedule and args.reference:
        raise ScheduleError("give either a SCHEDULE file or --reference KIND, not both")
    if args.schedule:
        schedule = load_schedule(args.schedule)
        if args.save:
            raise ScheduleError("--save is for reference schedules; copy the file instead")
    elif args.reference:
        schedule = _reference(args)
    else:
        raise ScheduleError("nothing to show; give a SCHEDULE file or --reference KIND (see 'calibrate show --help')")
    tokens = args.tokens if args.tokens is not None else schedule.context_length
    if tokens < 1:
        raise ScheduleError(f"prompt length {tokens} is not a positive number of tokens; pass e.g. --tokens 2048")
    print(render(schedule, tokens))
    if args.save:
        path = schedule.save(args.save)
        print(f"saved: {path}")
    return 0
