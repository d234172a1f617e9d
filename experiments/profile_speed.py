"""How much the profile's shortcut saves: a single-layer (or single-head) curve measured through the whole model
and from the compressed layer on, side by side, on what `calibrate run` profiles by default.

    python -m experiments.profile_speed [--layers 0 7 14 22 29] [--out docs/results/profile_speed_smollm2.json]

Both ways alternate per unit on the same evaluators (SmolLM2, generated filler and retrieval tasks, 1024-token
windows, the default grid of 5 ratios x 2 kinds); the curves must come out identical. A third way, from the
layer with forks that copy the prompt's slots of every layer they run (`Evaluator.into_room = False`) instead of
appending into the room the full caches reserved, times what that saves.
"""

from __future__ import annotations

import argparse
import json
import time

from calibrate.profiling import GRID
from calibrate.scoring import Evaluator, one_part_compressed
from runtime.schedule import write_atomic

from . import check_out, default_profile_evaluators


def curve_seconds(evaluators, base, layer: int, head: int | None, heads: int, from_layer: int, into_room=True):
    Evaluator.into_room = into_room
    t = time.perf_counter()
    kls = [e.score(one_part_compressed(base, layer, head or 0, r, heads if head is not None else None),
                   from_layer=from_layer).kl for r in GRID for e in evaluators]  # fmt: skip
    return time.perf_counter() - t, kls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 7, 14, 22, 29])
    p.add_argument("--out")
    args = p.parse_args(argv)
    check_out(args.out)
    model, evaluators, base = default_profile_evaluators()
    layers, heads = evaluators[0].layers, model.config.num_key_value_heads
    rows = []
    for layer in args.layers:
        for head in (None, 1):
            whole, kl_whole = curve_seconds(evaluators, base, layer, head, heads, 0)
            short, kl_short = curve_seconds(evaluators, base, layer, head, heads, layer)
            copying, kl_copying = curve_seconds(evaluators, base, layer, head, heads, layer, into_room=False)
            assert kl_whole == kl_short == kl_copying, (layer, head)
            rows.append({"layer": layer, "head": head, "whole_s": round(whole, 2), "from_layer_s": round(short, 2),
                         "from_layer_copying_s": round(copying, 2)})  # fmt: skip
            print(f"layer {layer:>2} head {'-' if head is None else head}: whole model {whole:5.2f} s, "
                  f"from its layer {short:5.2f} s ({whole / short:.2f}x; {copying:5.2f} s with forks that copy), "
                  "curves identical", flush=True)  # fmt: skip
    Evaluator.into_room = True
    whole = sum(r["whole_s"] for r in rows)
    short = sum(r["from_layer_s"] for r in rows)
    copying = sum(r["from_layer_copying_s"] for r in rows)
    result = {"units": rows, "speedup": round(whole / short, 2), "into_room_speedup": round(copying / short, 3),
              "layers": layers, "kv_heads": heads,
              "predicted_profile_minutes": {  # sampled layers spread evenly over the depth: their mean is the mean
                  "whole": round(whole / len(rows) * layers * (1 + heads) / 60, 1),
                  "from_layer": round(short / len(rows) * layers * (1 + heads) / 60, 1)}}  # fmt: skip
    print(
        f"sum over units: {whole:.1f} s whole, {short:.1f} s from the layer: {whole / short:.2f}x "
        f"({copying:.1f} s with forks that copy: {copying / short:.3f}x); "
        f"predicted sensitivity curves of a default profile: {result['predicted_profile_minutes']}"
    )
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
