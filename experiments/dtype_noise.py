"""Whether a profile can be measured in bfloat16: single-layer and single-head KLs of a few units, in float32 and in
bfloat16, on the same calibration examples.

    python -m experiments.dtype_noise [--out docs/results/dtype_noise_smollm2.json]

SmolLM2 on what `calibrate run` profiles by default (Tiny Shakespeare windows of 1024 + 128 tokens, generated
retrieval tasks). A bfloat16 forward rounds every hidden state and logit, so a compressed run differs from the
full-cache reference by rounding noise as well as by what compression removed; where that noise is larger than the
small KLs the allocation has to rank, the curves cannot be measured in that dtype.
"""

from __future__ import annotations

import argparse
import json
import time

from calibrate.data import CalibrationSet
from calibrate.models import load_model
from calibrate.scoring import one_part_compressed
from calibrate.settings import Settings
from runtime.schedule import Schedule, write_atomic

from . import check_out

# (layer, KV head or None for the whole layer, ratio): small and large KLs, shallow and deep
UNITS = [(5, None, 0.02), (15, 1, 0.1), (18, 0, 0.25), (25, 2, 0.05), (7, None, 0.5), (12, 2, 0.5)]


def kls(dtype: str, settings: Settings, units) -> list[dict]:
    model, tok = load_model(None, dtype, "cpu")
    layers = model.config.num_hidden_layers
    heads = model.config.num_key_value_heads
    text, tasks = CalibrationSet(tok, settings).evaluators(model, "calibration", settings.sinks)
    base = Schedule(ratios=[1.0] * layers, window=settings.window, sinks=settings.sinks)
    out = []
    for layer, head, ratio in units:
        sched = one_part_compressed(base, layer, head or 0, ratio, heads if head is not None else None)
        t = time.perf_counter()
        row = {"text_kl": text.score(sched, from_layer=layer).kl, "task_kl": tasks.score(sched, from_layer=layer).kl}
        out.append({"layer": layer, "head": head, "ratio": ratio, **row, "seconds": time.perf_counter() - t})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="calibration text (default ../shared/data/tinyshakespeare)")
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--units", type=int, default=len(UNITS), help="how many of the units to measure")
    p.add_argument("--out")
    args = p.parse_args(argv)
    check_out(args.out)
    from calibrate.paths import shared_data

    settings = Settings(data=[args.data or str(shared_data() / "tinyshakespeare")], context_length=args.context_length)
    units = UNITS[: args.units]
    result = {"context_length": args.context_length, "float32": kls("float32", settings, units)}
    result["bfloat16"] = kls("bfloat16", settings, units)
    print("| layer | head | ratio | text KL fp32 | bf16 | task KL fp32 | bf16 |\n|---|---|---|---|---|---|---|")
    for a, b in zip(result["float32"], result["bfloat16"], strict=True):
        print(f"| {a['layer']} | {'all' if a['head'] is None else a['head']} | {a['ratio']} | {a['text_kl']:.2e} | "
              f"{b['text_kl']:.2e} | {a['task_kl']:.2e} | {b['task_kl']:.2e} |")  # fmt: skip
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
