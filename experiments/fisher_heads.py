"""Per-head curves from the second-order (Fisher) estimate against the measured ones, on a profile's own windows.

    python -m experiments.fisher_heads [--schedule schedules/smollm2-135m-instruct_b0.3.json] \\
        [--profile schedules/smollm2-135m-instruct] [--samples 48] [--layers 0,10,20] [--out FILE]

Rebuilds the calibration windows the schedule's profile was measured on (its provenance settings), estimates
every head's KL at every grid ratio with `calibrate.head_fisher` and compares, per kind of example, with the
profile's measured head curves: the estimate as it is, and the measured layer curve split by the estimate's head
shares (`head_curves.from_shares`, what `calibrate` would use). `--save-profile STEM` also writes the profile
with the latter head curves, for `experiments.head_points`-style rebuilding and `paired_kl`. With every layer
estimated it also prints the screen of `experiments.head_curve_shortcuts` (the loss the measured curves predict
for the allocation the estimate gives, relative to theirs), as is and with the `--exact-layers` layers of widest
estimated split taking their measured curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from calibrate.data import CalibrationSet
from calibrate.head_curves import from_shares
from calibrate.head_fisher import SAMPLES, fisher_kl
from calibrate.models import load_model
from calibrate.profiling import Profile
from calibrate.settings import Settings
from runtime.families import model_info
from runtime.schedule import Schedule, Selection, load_schedule, write_atomic

from . import check_out
from .head_curve_shortcuts import Screen, weighted
from .head_points import widest_splits


def log_error(estimate: torch.Tensor, measured: torch.Tensor) -> dict[str, float]:
    """Median and 90th percentile of |log(estimate / measured)| over units with a measurable KL."""
    ok = measured > 1e-7
    err = (estimate[ok].clamp_min(1e-12) / measured[ok]).log().abs()
    return {"median": float(err.median()), "p90": float(err.quantile(0.9)), "units": int(ok.sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", default="schedules/smollm2-135m-instruct_b0.3.json")
    p.add_argument("--profile", default="schedules/smollm2-135m-instruct")
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", help="comma-separated layers to estimate (default: every compressible one)")
    p.add_argument(
        "--exact-layers", type=int, default=10, help="also screen these many layers of widest split measured"
    )
    p.add_argument("--save-profile", metavar="STEM")
    p.add_argument("--out")
    args = p.parse_args(argv)
    check_out(args.out)
    shipped = load_schedule(args.schedule)
    keep = {"argv", "device_map"}
    settings = Settings(**{k: v for k, v in shipped.provenance["settings"].items() if k not in keep})
    prof = Profile.load(args.profile)
    model, tok = load_model(settings.model)
    heads = model_info(model).num_kv_heads
    data = CalibrationSet(tok, settings)
    text, tasks = data.evaluators(model, "calibration", settings.sinks)
    evaluators = [text, *([tasks] if tasks else [])]
    sel = Selection(**prof.meta["selection"])
    base = Schedule(ratios=[1.0] * text.layers, window=prof.meta["window"], sinks=prof.meta["sinks"], selection=sel)
    layers = (
        [int(x) for x in args.layers.split(",")] if args.layers else [i for i, c in enumerate(prof.compressible) if c]
    )
    start = time.perf_counter()
    est_heads, est_layers = fisher_kl(evaluators, base, layers, prof.grid, heads, samples=args.samples, seed=args.seed)
    seconds = time.perf_counter() - start
    measured = prof.head_parts[:, layers]
    split_all = from_shares(prof.parts, est_heads, est_layers)  # [K, L, H, G], what `calibrate` would use
    split = split_all[:, layers]
    result = {
        "samples": args.samples,
        "layers": layers,
        "seconds": round(seconds, 1),
        "raw": log_error(est_heads[:, layers], measured),
        "layer_raw": log_error(est_layers[:, layers], prof.parts[:, layers]),
        "split": log_error(split, measured),
        "per_kind": {},
        "screen": {},
        "estimate_heads": est_heads.tolist(),
        "estimate_layers": est_layers.tolist(),
    }
    for k, name in enumerate(prof.part_names):
        result["per_kind"][name] = {
            "raw": log_error(est_heads[k, layers], measured[k]),
            "split": log_error(split[k], measured[k]),
            "layer_raw": log_error(est_layers[k, layers], prof.parts[k, layers]),
        }
    if len(layers) == sum(prof.compressible):  # the screen water-fills every compressible layer
        screen = Screen(prof, shipped.context_length, settings.sinks + settings.window)
        hybrid = split_all.clone()
        exact = widest_splits(est_heads, est_layers, args.exact_layers)
        hybrid[:, exact] = prof.head_parts[:, exact]
        for name, curves in (("split", split_all), ("exact_layers", hybrid)):
            result["screen"][name] = screen.of_curves(weighted(prof, curves))
        result["screen"]["exact_layers_measured"] = sorted(exact)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("estimate")}, indent=2))
    if args.save_profile:
        dataclasses.replace(prof, head_parts=split_all).save(args.save_profile)
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
