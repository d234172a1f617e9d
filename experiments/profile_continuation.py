"""The schedules a profile with shorter text continuations would give, for a held-out check (`paired_kl`).

    python -m experiments.profile_continuation schedules/smollm2-135m-instruct_b0.2.json [...] \\
        [--profile schedules/smollm2-135m-instruct] --continuation 64 --out-dir runs/continuation_64

A sensitivity curve's cost is mostly the continuation forward, and the text windows' continuation (128 tokens by
default) is most of its tokens. This measures the profile's text curves again, per layer and per KV head, with each
calibration window's continuation cut to its first `--continuation` tokens (the tasks' curves are kept: their
continuation is not cut), then rebuilds each schedule by its own trial parameters on the changed profile, as
`experiments.head_points` does, so that what differs is the profile alone. The windows are the profile's own,
rebuilt from its settings; before measuring, the full-length curves of its last layer are measured again and must
match the profile's, else the windows are not the ones it was measured on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from calibrate.data import CalibrationSet
from calibrate.models import load_model
from calibrate.profiling import Profile, single_layer_kl
from calibrate.progress import Progress
from calibrate.scoring import Evaluator, Example
from calibrate.settings import Settings
from runtime.families import model_info
from runtime.schedule import Schedule, Selection, load_schedule, write_atomic

from .head_points import rebuild


def cut(examples: list[Example], tokens: int) -> list[Example]:
    """The same examples with only the first `tokens` continuation tokens (attention is causal, so the scores of
    those tokens are the ones the full continuation gave them)."""
    return [dataclasses.replace(e, continuation=e.continuation[:tokens], scored=e.scored[:tokens]) for e in examples]


def shares(s: Schedule) -> list[list[float]]:
    """Every KV head's share, or every layer's where the schedule has no per-head shares."""
    return s.head_ratios if s.head_ratios is not None else [[r] for r in s.ratios]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("schedules", nargs="+", help="calibrated schedules whose parameters are rebuilt")
    p.add_argument("--profile", default="schedules/smollm2-135m-instruct", help="their profile's stem")
    p.add_argument("--continuation", type=int, default=64, help="text continuation tokens to keep (default 64)")
    p.add_argument(
        "--full-at",
        default="",
        metavar="RATIOS",
        help="grid ratios whose text curves keep the full continuation (e.g. 0.25,0.5: where the KL is smallest, so "
        "its estimate is noisiest); the others are cut",
    )
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    prof = Profile.load(args.profile)
    if prof.head_parts is None or "text" not in prof.part_names:
        raise SystemExit(f"error: --profile {args.profile} has no per-head text curves")
    saved = {k: v for k, v in prof.meta["settings"].items() if k in {f.name for f in dataclasses.fields(Settings)}}
    settings = Settings(**saved)
    if not 1 < args.continuation < settings.continuation:
        raise SystemExit(
            f"error: --continuation {args.continuation}: must be between 2 and the profile's {settings.continuation}"
        )
    full_at = [float(x) for x in args.full_at.split(",") if x]
    if any(r not in prof.grid for r in full_at):
        raise SystemExit(f"error: --full-at {args.full_at}: every ratio must be one of the profile's grid {prof.grid}")
    cut_points = [g for g, r in enumerate(prof.grid) if r not in full_at]
    shipped = [(path, load_schedule(path)) for path in args.schedules]
    for path, s in shipped:  # every check before measuring: a stopped run leaves nothing behind
        if shares(rebuild(s, prof)) != shares(s):
            raise SystemExit(f"error: {path} is not rebuilt from {args.profile} by its own parameters; stop")
    model, tok = load_model(settings.model, settings.dtype, settings.device)
    text = CalibrationSet(tok, settings).calib_text
    layers = len(prof.compressible)
    heads = model_info(model).num_kv_heads
    k = prof.part_names.index("text")
    base = Schedule(ratios=[1.0] * layers, window=settings.window, sinks=settings.sinks, selection=Selection())
    progress = Progress()

    # the profile's own windows? its last layer's curves, measured again at full length
    last = [i == layers - 1 for i in range(layers)]
    full = Evaluator(model, text, query_window=64, sinks=settings.sinks)
    again = single_layer_kl([full], base, last, prof.grid)[0, -1]
    again_heads = single_layer_kl([full], base, last, prof.grid, heads=heads)[0, -1]
    want, want_heads = prof.parts[k, -1], prof.head_parts[k, -1]
    # float noise only (the profile may be from another torch or an earlier, equivalent path): other windows would
    # differ by far more
    drift = max(
        float(((a - b).abs() / b.abs().clamp_min(1e-9)).max()) for a, b in ((again, want), (again_heads, want_heads))
    )
    if drift > 5e-3:
        raise SystemExit(f"error: the last layer's text curves {again.tolist()} are not the profile's {want.tolist()}")
    print(f"the profile's windows: its last layer's text curves come back to {drift:.1e} relative")
    del full

    t0 = time.perf_counter()
    short = Evaluator(model, cut(text, args.continuation), query_window=64, sinks=settings.sinks)
    grid = [prof.grid[g] for g in cut_points]
    layer_curves = single_layer_kl([short], base, prof.compressible, grid, progress)[0]
    head_curves = single_layer_kl([short], base, prof.compressible, grid, progress, heads=heads)[0]
    seconds = time.perf_counter() - t0
    progress.close()
    parts, head_parts = prof.parts.clone(), prof.head_parts.clone()
    parts[k][:, cut_points], head_parts[k][:, :, cut_points] = layer_curves, head_curves  # views of row k
    changed = dataclasses.replace(prof, parts=parts, head_parts=head_parts, sensitivity=parts.mean(0))

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = {"text_continuation": args.continuation, "full_at": full_at}
    for path, s in shipped:
        new = rebuild(s, changed)
        new.provenance = {**s.provenance, "profile_change": label, "rebuilt_from": path}
        target = out_dir / Path(path).name
        new.save(target)
        moved = max(abs(a - b) for ra, rb in zip(shares(new), shares(s), strict=True) for a, b in zip(ra, rb))
        print(f"{target}: KV {new.kv_fraction():.4f}, largest head share change {moved:.3f}")
    # how the cut curves compare with the full ones (where both are above the noise floor)
    old = prof.head_parts[k][..., cut_points]
    mask = old > 1e-4
    log_ratio = (head_curves[mask] / old[mask]).log()
    summary = {
        **label,
        "seconds_text_curves": round(seconds, 1),
        "full_length_drift": drift,
        "head_curve_log_ratio_median": round(float(log_ratio.median()), 4),
        "head_curve_log_ratio_abs_p90": round(float(log_ratio.abs().quantile(0.9)), 4),
        "out_dir": str(out_dir),
        "curves": {"grid": grid, "layers": layer_curves.tolist(), "heads": head_curves.tolist()},
    }
    write_atomic(out_dir / "text_curves.json", json.dumps(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
