"""What one sensitivity measurement costs, by part of the calibration data (issue: calibration speed).

    python -m experiments.unit_cost [--model M] [--context-length 1024] [--cut 64] [--repeats 3] [--out FILE]

A profile curve is one scoring per grid ratio of the text windows and of the retrieval tasks, each with only one
layer or KV head compressed and the continuation run from that layer on. This times those scorings on
`calibrate run`'s default data (no --data: generated filler and tasks) for units spread over the depth: the text
windows with their whole continuation and cut to --cut tokens (`experiments.profile_continuation` measures what
the cut does to the schedules), the tasks in batches of 4 and all in one (`CalibrationSet.evaluators`' batch),
alternating, and checks that the two task batchings give the same KL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from calibrate.data import CalibrationSet
from calibrate.errors import CalibrateError
from calibrate.models import load_model
from calibrate.scoring import Evaluator, one_part_compressed
from calibrate.settings import Settings, check_cut
from calibrate.tasks import cut_continuations
from runtime.families import model_info
from runtime.schedule import Schedule, Selection, write_atomic

from . import check_out

UNITS = (0.2, 0.5, 0.8)  # depths of the timed units (as a share of the layers), KV head 1 of each at ratio 0.1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--context-length", type=int, default=Settings.context_length)
    p.add_argument("--cut", type=int, default=64, help="text continuation tokens of the cut variant")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    check_out(args.out)
    settings = Settings(model=args.model, context_length=args.context_length)
    try:
        check_cut(args.cut, settings.continuation, "--cut", "e.g. --cut 64")
    except CalibrateError as e:
        raise SystemExit(f"error: {e}") from None
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats {args.repeats}: must be at least 1, e.g. --repeats 3")
    model, tok = load_model(args.model)
    data = CalibrationSet(tok, settings)
    sinks = settings.sinks
    text, tasks = data.evaluators(model, "calibration", sinks)  # what the profile scores, as it builds them
    evaluators = {
        "text": text,
        f"text cut to {args.cut}": Evaluator(
            model, cut_continuations(data.calib_text, args.cut), query_window=64, sinks=sinks
        ),
        "tasks in 4s": Evaluator(model, data.calib_tasks, query_window=64, sinks=sinks, batch_size=4),
        "tasks in one": tasks,
    }
    layers = evaluators["text"].layers
    heads = model_info(model).num_kv_heads
    base = Schedule(ratios=[1.0] * layers, window=settings.window, sinks=sinks, selection=Selection())
    units = [min(layers - 1, int(d * layers)) for d in UNITS]
    seconds: dict[str, list[float]] = {name: [] for name in evaluators}
    kls: dict[str, list[float]] = {name: [] for name in evaluators}
    for rep in range(args.repeats):
        for name, ev in evaluators.items():  # alternating, so drifts of the machine hit every part alike
            t = time.perf_counter()
            for layer in units:
                sched = one_part_compressed(base, layer, min(1, heads - 1), 0.1, heads if heads > 1 else None)
                kl = ev.score(sched, from_layer=layer).kl
                if rep == 0:
                    kls[name].append(kl)
            seconds[name].append(time.perf_counter() - t)
    med = {name: statistics.median(s) for name, s in seconds.items()}
    full = med["text"] + med["tasks in 4s"]
    rows = [
        {"part": name, "seconds": round(m, 3), "vs text + tasks in 4s": round(m / full, 3)} for name, m in med.items()
    ]
    agree = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(kls["tasks in one"], kls["tasks in 4s"], strict=True))
    result = {
        "context_length": args.context_length,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "units": [{"layer": layer, "head": min(1, heads - 1), "ratio": 0.1} for layer in units],
        "rows": rows,
        "tasks_one_vs_4s": round(med["tasks in one"] / med["tasks in 4s"], 3),
        # both with the tasks as `calibrate` scores them (in one batch)
        "cut_vs_full": round(
            (med[f"text cut to {args.cut}"] + med["tasks in one"]) / (med["text"] + med["tasks in one"]), 3
        ),
        "task_kl_max_relative_difference": agree,
    }
    print(f"| part ({len(units)} units, median of {args.repeats}) | seconds | share of text + tasks in 4s |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['seconds']:.3f} | {r['vs text + tasks in 4s']:.3f} |")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "units")}))
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
