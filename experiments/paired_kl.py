"""Calibrated schedules against uniform, PyramidKV and PyramidInfer at equal KV memory, paired per window.

    python -m experiments.paired_kl schedules/smollm2-135m-instruct_b0.3.json [...] \\
        [--data wikitext2 gutenberg] [--windows 24] [--context 2048] [--continuation 128] [--leave-out FILE ...]

Text that calibration never saw: WikiText-2 (test) and the Gutenberg novels, less any file that one of the
schedules was calibrated on (read from its provenance) or that --leave-out names (excluded files are printed).
Every method is scored on the same prefilled windows (evict mode): KL(full || compressed) per continuation
token, perplexity, and the number of windows on which the calibrated schedule has the lower KL than each
baseline. References are built at the calibrated schedule's own KV fraction at --context tokens, so memory is
equal.
"""

from __future__ import annotations

import argparse
import json

from calibrate import data, tasks
from calibrate import scoring as evaluator
from calibrate.models import load_model
from calibrate.paths import shared_data
from runtime.families import model_info
from runtime.reference import at_budget
from runtime.schedule import load_schedule, write_atomic

from . import check_out

SOURCES = {"wikitext2": "wikitext2_raw_test", "gutenberg": "gutenberg"}
BASELINES = ("uniform", "pyramidkv", "pyramidinfer")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("schedules", nargs="+")
    p.add_argument("--model")
    p.add_argument("--data", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument(
        "--leave-out", nargs="*", default=[], metavar="FILE", help="also leave out these (a development text)"
    )
    p.add_argument("--out", help="also write the results as JSON")
    args = p.parse_args(argv)
    check_out(args.out)
    model, tok = load_model(args.model)
    info = model_info(model)
    results = []
    print(f"{args.windows} windows of {args.context} + {args.continuation} tokens per data set, evict mode")
    print("| data | KV fraction | method | KL | PPL | calibrated wins (windows) |\n|---|---|---|---|---|---|")
    seen = [src for path in args.schedules for src in load_schedule(path).provenance.get("data", {}).get("sources", [])]
    seen += args.leave_out
    for name in args.data:
        files, excluded = data.held_out([shared_data() / SOURCES[name]], seen)
        if excluded:
            print(f"{name}: left out (calibrated on or --leave-out): {', '.join(f.name for f in excluded)}")
        if not files:
            raise SystemExit(f"every {name} file was calibrated on or left out; nothing held out to evaluate on")
        stream = data.token_stream(tok, data.load_texts(files))
        windows = data.cut_windows(stream, args.context + args.continuation, args.windows, seed=1)
        ev = evaluator.Evaluator(model, tasks.text_examples(windows, args.context))
        full = ev.score(ev.probe)
        for path in args.schedules:
            calibrated = load_schedule(path)
            kv = calibrated.kv_fraction(args.context)
            ours = ev.score(calibrated)
            rows = [("calibrated", ours, None)]
            for kind in BASELINES:
                ref = at_budget(kind, info.num_layers, kv, prompt_tokens=args.context, model=info)
                sc = ev.score(ref)
                wins = sum(a < b for a, b in zip(ours.per_example_kl, sc.per_example_kl, strict=True))
                rows.append((kind, sc, wins))
            for method, sc, wins in rows:
                won = "" if wins is None else f"{wins}/{len(windows)}"
                print(f"| {name} | {kv:.3f} | {method} | {sc.kl:.4f} | {sc.ppl:.2f} | {won} |", flush=True)
                results.append(
                    {
                        "data": name,
                        "schedule": str(path),
                        "kv_fraction": kv,
                        "method": method,
                        "kl": sc.kl,
                        "ppl": sc.ppl,
                        "calibrated_wins": wins,
                        "windows": len(windows),
                        "files": [f.name for f in files],
                        "per_window_kl": sc.per_example_kl,
                    }  # fmt: skip
                )
        print(f"| {name} | 1.000 | full cache | 0 | {full.ppl:.2f} | |")
        results.append(
            {
                "data": name,
                "kv_fraction": 1.0,
                "method": "full cache",
                "kl": 0.0,
                "ppl": full.ppl,
                "windows": len(windows),
                "files": [f.name for f in files],
            }  # fmt: skip
        )
    if args.out:
        write_atomic(args.out, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
