"""Per-head curves without per-head forwards: the layer's measured curve split over its KV heads by how much
attention each head's selection loses (1 - recall), screened offline against the measured per-head curves.

    python -m experiments.recall_head_split [--profile schedules/smollm2-135m-instruct] [--out FILE]

The recall pass (one continuation forward per batch, on the profile's own calibration data, rebuilt from the
settings recorded in it) gives each KV head's attention recall at every grid ratio. A model of head h's curve is
then `layer curve x (1 - recall_h) / sum over the layer's heads of (1 - recall)` (or the same with overlap). Each
model is water-filled and scored, like `head_curve_shortcuts`, by the loss the *measured* head curves predict
for its allocation, relative to the allocation from the measured curves. The heads' mean recall must equal the
profile's recorded per-layer recall (the same data and code), which the run checks.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from calibrate.data import CalibrationSet
from calibrate.models import load_model
from calibrate.profiling import Profile, attention_recall
from calibrate.settings import Settings
from runtime.schedule import Selection, write_atomic

from . import check_out
from .head_curve_shortcuts import BUDGETS, Screen, weighted


def split_by_loss(profile: Profile, lost: torch.Tensor) -> torch.Tensor:
    """[K, L, H, G] head curves: each kind's layer curve [K, L, G] shared out over heads in proportion to `lost`
    [L, H, G] (equal shares where a layer loses nothing)."""
    shares = lost.clamp_min(0) / lost.clamp_min(0).sum(1, keepdim=True).clamp_min(1e-12)
    return profile.parts[:, :, None, :] * shares[None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="schedules/smollm2-135m-instruct", help="profile stem with head curves")
    p.add_argument("--out")
    args = p.parse_args(argv)
    check_out(args.out)
    prof = Profile.load(args.profile)
    if prof.head_parts is None:
        raise SystemExit(f"error: --profile {args.profile} has no per-head curves; profile without --no-per-head")
    meta = prof.meta
    keyed = {k: v for k, v in meta["settings"].items() if k not in Settings.NOT_IN_KEY}
    settings = Settings(**keyed)
    t = time.perf_counter()
    model, tok = load_model(settings.model, settings.dtype, "cpu")
    data = CalibrationSet(tok, settings)
    text = data.evaluators(model, "calibration", settings.sinks)[0]
    selection = Selection(**meta["selection"])
    recall, overlap, _ = attention_recall(
        model, text, meta["sinks"], meta["window"], selection, prof.grid, [meta["window"]], by_head=True
    )
    seconds = time.perf_counter() - t
    drift = float((recall.mean(1) - prof.recall).abs().max())
    print(f"recall pass on the profile's data: {seconds:.0f} s; head-mean recall - the profile's: max {drift:.1e}")
    assert drift < 1e-4, "not the profile's data: the per-layer recall differs"

    screen = Screen(prof, settings.context_length, meta["sinks"] + meta["window"])
    models = {
        "1 - recall": split_by_loss(prof, 1 - recall),
        "1 - overlap": split_by_loss(prof, 1 - overlap),
        "(1 - recall)^2": split_by_loss(prof, (1 - recall) ** 2),
        "equal split": split_by_loss(prof, torch.ones_like(recall)),
    }
    rows = [{"model": name, **screen.of_curves(weighted(prof, parts))} for name, parts in models.items()]
    print("| head curves from | " + " | ".join(f"loss at {b:g}" for b in BUDGETS) + " |")
    print("|---|" + "---|" * len(BUDGETS))
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(f"{r[f'b{b:g}']:.3f}x" for b in BUDGETS) + " |")
    if args.out:
        result = {"profile": args.profile, "recall_seconds": round(seconds, 1), "exact_loss": screen.exact,
                  "rows": rows, "recall_by_head": recall.tolist(), "overlap_by_head": overlap.tolist()}  # fmt: skip
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
