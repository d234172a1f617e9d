"""What staggering the layers' trims does to decode step times: the same schedule with every layer trimming on the
same step (`decode.stagger` false) and with the trims spread over the interval (true), side by side in one run.

    python -m experiments.stagger_steps [--schedule schedules/smollm2-135m-instruct_b0.3.json] [--out FILE]

SmolLM2 (fp32, CPU), prompts cut from ../shared/data/gutenberg as `calibrate bench` cuts them; the two settings
alternate, the order reversing every other repeat, each warmed once through its first trim. Every decode step is
timed on its own; a step is a trim step when some compressed layer trims after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

from calibrate import benchmark as bench
from calibrate import data
from calibrate.commands.bench import default_text
from calibrate.models import load_model
from runtime.schedule import load_schedule, write_atomic

from . import check_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", default="schedules/smollm2-135m-instruct_b0.3.json")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    check_out(args.out)
    model, tok = load_model(None, "float32", "cpu")
    base = load_schedule(args.schedule)
    settings = {
        stagger: dataclasses.replace(base, decode=dataclasses.replace(base.decode, stagger=stagger))
        for stagger in (False, True)
    }
    stream = data.token_stream(tok, data.load_texts([default_text()]))
    ids = data.cut_windows(stream, args.context, args.batch)
    mask = ids.new_ones(ids.shape)

    def run(stagger: bool, steps: int) -> bench.RunStats:
        import runtime

        with runtime.apply(model, settings[stagger]):
            return bench.greedy_run(model, ids, mask, steps, schedule=settings[stagger])

    for stagger in settings:
        run(stagger, base.decode.interval + 2)
    runs: dict[bool, list[bench.RunStats]] = {False: [], True: []}
    for i in range(args.repeats):
        for stagger in (False, True) if i % 2 == 0 else (True, False):
            runs[stagger].append(run(stagger, args.new_tokens))
            print(f"repeat {i + 1}: stagger {stagger}: {runs[stagger][-1]}", flush=True)

    def summary(rs: list[bench.RunStats]) -> dict:
        med = bench.median_run(rs)
        return {**dataclasses.asdict(med), "step_ms_max": max(med.plain_step_ms_max, med.trim_step_ms_max or 0.0)}

    result = {
        "schedule": args.schedule,
        "batch": args.batch,
        "context": args.context,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "interval": base.decode.interval,
        "aligned": summary(runs[False]),
        "staggered": summary(runs[True]),
        "runs": {str(k).lower(): [dataclasses.asdict(r) for r in v] for k, v in runs.items()},
    }
    a, s = result["aligned"], result["staggered"]
    print("| | aligned trims | staggered trims |\n|---|---|---|")
    for label, key in [("decode tokens/s", "decode_tokens_per_s"), ("trim steps", "trim_steps"),
                       ("plain step ms, mean", "plain_step_ms_mean"), ("trim step ms, mean", "trim_step_ms_mean"),
                       ("slowest step ms", "step_ms_max"), ("KV MiB peak", "kv_bytes_peak")]:  # fmt: skip
        scale = 2**-20 if key.startswith("kv") else 1
        print(f"| {label} | {a[key] * scale:.1f} | {s[key] * scale:.1f} |")
    spread = statistics.pstdev([r.decode_tokens_per_s for r in runs[False]])
    print(f"decode tokens/s staggered / aligned: {s['decode_tokens_per_s'] / a['decode_tokens_per_s']:.3f}x "
          f"(aligned runs' spread {spread:.1f} tokens/s)")  # fmt: skip
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
