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

import torch

from calibrate.data import CalibrationSet
from calibrate.errors import CalibrateError
from calibrate.models import load_model
from calibrate.profiling import Profile, single_layer_kl
from calibrate.progress import Progress
from calibrate.scoring import Evaluator
from calibrate.settings import Settings, check_cut
from calibrate.tasks import cut_continuations
from runtime.families import model_info
from runtime.schedule import Schedule, write_atomic

from . import check_out
from .head_points import rebuilt_from, write_rebuilt


def with_text_curves(prof: Profile, points: list[int], layers: torch.Tensor, heads: torch.Tensor) -> Profile:
    """`prof` with its text curves at grid points `points` replaced by `layers` [L, n] and `heads` [L, H, n]; the
    other points and the tasks' curves as they were, the mean over kinds recomputed."""
    k = prof.part_names.index("text")
    parts, head_parts = prof.parts.clone(), prof.head_parts.clone()
    parts[k][:, points], head_parts[k][:, :, points] = layers, heads  # views of row k: they write into the clones
    return dataclasses.replace(prof, parts=parts, head_parts=head_parts, sensitivity=parts.mean(0))


def _grid_points(arg: str, grid: list[float]) -> list[int]:
    """The grid points to cut: all but those `--full-at` names."""
    try:
        full_at = [float(x) for x in arg.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(
            f"error: --full-at {arg}: not a comma-separated list of ratios, e.g. --full-at 0.25,0.5"
        ) from None
    if any(r not in grid for r in full_at):
        raise SystemExit(f"error: --full-at {arg}: every ratio must be one of the profile's grid {grid}")
    points = [g for g, r in enumerate(grid) if r not in full_at]
    if not points:
        raise SystemExit(f"error: --full-at {arg} keeps the whole grid {grid}: nothing left to cut; leave one out")
    return points


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
    p.add_argument("--out-dir", required=True, help="the rebuilt schedules go here")
    p.add_argument("--out", help="also write the cut curves and how they compare with the profile's, as JSON")
    args = p.parse_args(argv)
    check_out(args.out)
    prof = Profile.load(args.profile)
    if prof.head_parts is None or "text" not in prof.part_names:
        raise SystemExit(f"error: --profile {args.profile} has no per-head text curves; give one calibrated on --data")
    if "head_curves" in prof.meta or prof.meta.get("head_points", prof.grid) != prof.grid:
        raise SystemExit(
            f"error: --profile {args.profile}: its head curves are not all measured (Fisher or --head-points); "
            "give a profile measured at the defaults"
        )
    if prof.meta["settings"].get("profile_continuation") is not None:
        raise SystemExit(
            f"error: --profile {args.profile} was measured with --profile-continuation "
            f"{prof.meta['settings']['profile_continuation']}; give a profile that scored every continuation token"
        )
    settings = Settings.saved(prof.meta["settings"])
    try:
        check_cut(args.continuation, settings.continuation, "--continuation", f"e.g. {settings.continuation // 2}")
    except CalibrateError as e:
        raise SystemExit(f"error: {e}") from None
    points = _grid_points(args.full_at, prof.grid)
    shipped = rebuilt_from(args.schedules, prof, args.profile, args.out_dir)
    model, tok = load_model(settings.model, settings.dtype, settings.device, settings.device_map)
    text = CalibrationSet(tok, settings).calib_text
    heads = model_info(model).num_kv_heads
    k = prof.part_names.index("text")
    base = Schedule(ratios=[1.0] * len(prof.compressible), window=settings.window, sinks=settings.sinks)
    progress = Progress()

    # the profile's own windows? its last compressible layer's curves, measured again at full length: float noise
    # only (another torch, or an earlier equivalent path) where other windows would differ by far more
    last = max(i for i, c in enumerate(prof.compressible) if c)
    only = [i == last for i in range(len(prof.compressible))]
    full = Evaluator(model, text, query_window=64, sinks=settings.sinks)
    again = single_layer_kl([full], base, only, prof.grid)[0, last]
    again_heads = single_layer_kl([full], base, only, prof.grid, heads=heads)[0, last]
    pairs = ((again, prof.parts[k, last]), (again_heads, prof.head_parts[k, last]))
    drift = max(float(((a - b).abs() / (b.abs() + 1e-7)).max()) for a, b in pairs)
    if drift > 2e-2:
        raise SystemExit(
            f"error: --profile {args.profile}: layer {last}'s text curves measured again differ from the saved ones by "
            f"{drift:.1e} relative: not the windows it was measured on (run from the folder it was calibrated in, "
            "so that its --data paths resolve, with the same model)"
        )
    print(f"the profile's windows: layer {last}'s text curves come back to {drift:.1e} relative")
    del full

    t0 = time.perf_counter()
    short = Evaluator(model, cut_continuations(text, args.continuation), query_window=64, sinks=settings.sinks)
    grid = [prof.grid[g] for g in points]
    layer_curves = single_layer_kl([short], base, prof.compressible, grid, progress)[0]
    head_curves = single_layer_kl([short], base, prof.compressible, grid, progress, heads=heads)[0]
    seconds = time.perf_counter() - t0
    progress.close()

    # how the cut head curves compare with the whole continuation's, where both are above the noise floor
    old = prof.head_parts[k][..., points]
    above = (old > 1e-4) & (head_curves > 1e-4)
    log_ratio = (head_curves[above] / old[above]).log()
    full_at = [r for r in prof.grid if r not in grid]
    label = {"text_continuation": args.continuation, "full_at": full_at}
    summary = {
        **label,
        "seconds_text_curves": round(seconds, 1),
        "full_length_drift": drift,
        "head_curves_compared": int(above.sum()),
        "head_curve_log_ratio_median": round(float(log_ratio.median()), 4) if above.any() else None,
        "head_curve_log_ratio_abs_p90": round(float(log_ratio.abs().quantile(0.9)), 4) if above.any() else None,
        "curves": {"grid": grid, "layers": layer_curves.tolist(), "heads": head_curves.tolist()},
    }
    write_rebuilt(shipped, with_text_curves(prof, points, layer_curves, head_curves), {"profile_change": label},
                  args.out_dir)  # fmt: skip
    if args.out:
        write_atomic(args.out, json.dumps(summary) + "\n")
    print(json.dumps({key: v for key, v in summary.items() if key != "curves"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
