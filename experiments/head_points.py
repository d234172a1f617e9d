"""The schedules a profile with head curves at fewer grid points would give, for a held-out check (`paired_kl`).

    python -m experiments.head_points schedules/smollm2-135m-instruct_b0.2.json [...] \\
        [--profile schedules/smollm2-135m-instruct] [--points 0.02,0.1,0.5 | --fisher runs/fisher.json] \\
        --out-dir runs/head_points

For each schedule, its own trial parameters (`provenance.params`, e.g. the per-head water-fill) are rebuilt on
the profile whose head curves keep only the measured values at `--points` and take the rest from the layer curve's
shape (`calibrate.head_curves`): the schedule `calibrate run --head-points` would write, because measuring fewer
points changes nothing at the points measured; with `--fisher`, on the profile whose head curves split each
measured layer curve by a saved Fisher estimate (`--head-curves fisher`). It first rebuilds each schedule from the
full profile and stops unless that gives the shipped shares back, so what differs is the head curves alone. Then
score both sets on the same windows:

    python -m experiments.paired_kl runs/head_points/*.json schedules/smollm2-135m-instruct_b0.3.json ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from calibrate.errors import CalibrateError
from calibrate.head_curves import check_points, from_layer_shape, from_shares, head_shares
from calibrate.profiling import Profile
from calibrate.search_space import Space, schedule_of_params
from calibrate.settings import check_writable, head_points_from_arg
from runtime.schedule import Schedule, load_schedule


def widest_splits(head_estimate: torch.Tensor, layer_estimate: torch.Tensor, count: int) -> list[int]:
    """The `count` layers whose heads' estimated shares of the layer's KL differ most (max - min share, averaged
    over kinds and ratios), widest first: where an error in the estimate moves the allocation most."""
    share = head_shares(head_estimate, layer_estimate)
    spread = (share.amax(2) - share.amin(2)).mean((0, 2))  # [L]
    return sorted(range(spread.numel()), key=lambda i: -float(spread[i]))[:count]


def rebuild(shipped: Schedule, profile: Profile) -> Schedule:
    """The schedule that `shipped`'s own trial parameters give on `profile`."""
    params = shipped.provenance["params"]
    space = Space(
        # a multi-budget study pins each trial's budget in its parameters; a one-budget study's is the schedule's
        budget=params.get("budget", shipped.budget),
        context_length=shipped.context_length,
        profile=profile,
        model=shipped.model,
        sinks=shipped.sinks,
    )
    return schedule_of_params(params, space)


def shares(s: Schedule) -> list[list[float]]:
    """Every KV head's share, or every layer's where the schedule has no per-head shares."""
    return s.head_ratios if s.head_ratios is not None else [[r] for r in s.ratios]


def rebuilt_from(paths: list[str], profile: Profile, stem: str, out_dir: str) -> list[tuple[str, Schedule]]:
    """The schedules at `paths`, each checked to be rebuilt from `profile` (at `stem`) by its own parameters, so
    that a changed profile is all that differs afterwards; and their targets in `out_dir` checked to be writable,
    distinct, and none of the inputs. Every check before any measuring or writing: a stopped run leaves nothing
    behind."""
    inputs = {Path(path).resolve() for path in paths}
    targets: set[Path] = set()
    out = []
    for path in paths:
        target = Path(out_dir) / Path(path).name
        if target.resolve() in inputs:
            raise SystemExit(f"error: --out-dir {out_dir} would overwrite the input {target}; choose another folder")
        if target.resolve() in targets:
            raise SystemExit(f"error: two schedules would both be written to {target}; rebuild them in two runs")
        targets.add(target.resolve())
        try:
            check_writable(target, "--out-dir")
        except CalibrateError as e:
            raise SystemExit(f"error: {e}") from None
        shipped = load_schedule(path)
        again = rebuild(shipped, profile)
        if again.ratios != shipped.ratios or again.head_ratios != shipped.head_ratios:
            raise SystemExit(f"error: {path} is not rebuilt from {stem} by its own parameters; give its own --profile")
        out.append((path, shipped))
    return out


def write_rebuilt(schedules: list[tuple[str, Schedule]], profile: Profile, provenance: dict, out_dir: str) -> None:
    """Each schedule rebuilt by its own parameters on `profile`, with `provenance` added, written to `out_dir`
    (every one rebuilt before the first is written)."""
    rebuilt = []
    for path, shipped in schedules:
        new = rebuild(shipped, profile)
        new.provenance = {**shipped.provenance, **provenance, "rebuilt_from": path}
        rebuilt.append((path, shipped, new))
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for path, shipped, new in rebuilt:
        target = folder / Path(path).name
        new.save(target)
        moved = max(abs(a - b) for ra, rb in zip(shares(new), shares(shipped), strict=True) for a, b in zip(ra, rb))
        print(f"{target}: KV {new.kv_fraction():.4f}, largest head share change {moved:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("schedules", nargs="+", help="calibrated schedules whose parameters are rebuilt")
    p.add_argument("--profile", default="schedules/smollm2-135m-instruct", help="their profile's stem")
    p.add_argument("--points", default="0.02,0.1,0.5", help="grid ratios where head curves are kept, or 'all'")
    p.add_argument(
        "--fisher",
        metavar="JSON",
        help="instead of --points: head curves split by the estimate in this `experiments.fisher_heads --out` file "
        "(what `calibrate run --head-curves fisher` would write)",
    )
    p.add_argument(
        "--exact-layers",
        type=int,
        default=0,
        help="with --fisher: keep the measured head curves of this many layers, those whose estimated head shares "
        "differ most (`widest_splits`)",
    )
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    prof = Profile.load(args.profile)
    if prof.head_parts is None:
        raise SystemExit(f"error: --profile {args.profile} has no per-head curves")
    try:
        points = check_points(head_points_from_arg(args.points), prof.grid)
    except (CalibrateError, ValueError) as e:
        raise SystemExit(f"error: --points {args.points}: {e}") from None
    shipped = rebuilt_from(args.schedules, prof, args.profile, args.out_dir)
    if args.fisher:
        estimate = json.loads(Path(args.fisher).read_text())
        est_heads, est_layers = torch.tensor(estimate["estimate_heads"]), torch.tensor(estimate["estimate_layers"])
        heads = from_shares(prof.parts, est_heads, est_layers)
        exact = widest_splits(est_heads, est_layers, args.exact_layers)
        heads[:, exact] = prof.head_parts[:, exact]
        label = {"head_curves": {"method": "fisher", "samples": estimate["samples"], "exact_layers": sorted(exact)}}
    else:
        heads = from_layer_shape(prof.parts, prof.head_parts[..., points], prof.grid, points)
        label = {"head_points": [prof.grid[g] for g in points]}
    sparse = dataclasses.replace(prof, head_parts=heads)
    write_rebuilt(shipped, sparse, label, args.out_dir)
    print(json.dumps({**label, "out_dir": args.out_dir}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
