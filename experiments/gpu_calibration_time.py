"""What `calibrate run` costs at 8B scale on one GPU: profile (per layer and per KV head) and search trials on a
random-init 8B-shaped Llama with generated data. Random weights give meaningless curves but true costs.

    python -m experiments.gpu_calibration_time --tokenizer TOK --out calibration_time_h200.json   # on a GPU
    python -m experiments.gpu_calibration_time --shape tiny --device cpu --out /tmp/t.json         # dry run

TOK is any tokenizer folder (the GPU machine has no network: save SmolLM2's with
`python -c "from calibrate.models import load_model; load_model()[1].save_pretrained('gpu_tokenizer')"` and carry
it). Parts, each written to --out as soon as it is measured: the full-cache prefill of the calibration and
validation examples; the attention-recall pass; single-layer and single-head curves for --sample-layers layers
spread over the depth (a curve runs the continuation from its layer on, so its cost falls with depth and an even
spread estimates the mean), extrapolated to every layer and head; the Fisher estimate of the head curves
(`--head-curves fisher`) for the same layers, its gradient samples timed apart; --trials search trials (Optuna,
in memory); the peak GPU memory; and the predicted wall time of `calibrate run --context-length N` with its
default 40 trials, with measured and with Fisher head curves.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import optuna
import torch
from transformers import AutoTokenizer

from calibrate import profiling
from calibrate import search_space as s
from calibrate.data import CalibrationSet
from calibrate.head_curves import check_points, from_layer_shape
from calibrate.head_fisher import SAMPLES, fisher_kl, sampled_gradients
from calibrate.settings import Settings
from runtime.families import model_info
from runtime.schedule import Schedule, Selection, write_atomic

from . import check_out
from .shapes import SHAPES, build_model
from .shapes import peak_memory as _peak

DEFAULT_TRIALS = 40


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--device", default="cuda")
    # float32, as calibrate run: a bfloat16 profile has a KL noise floor of ~1e-3 (experiments.dtype_noise)
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokenizer", help="tokenizer folder (default: the embedded SmolLM2's)")
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--sample-layers", type=int, default=4, help="layers whose curves are measured (default 4)")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    check_out(args.out)
    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from calibrate.models import local_folder, resolve

        tok = AutoTokenizer.from_pretrained(local_folder(resolve(None)))
    result: dict = {"shape": args.shape, **SHAPES[args.shape], "device": args.device, "dtype": args.dtype,
                    "context_length": args.context_length, "parts": {}}  # fmt: skip
    if args.device.startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name()

    def record(name: str, **values) -> None:
        result["parts"][name] = {**values, "peak_memory_bytes": _peak(args.device)}
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
        print(name, values, flush=True)

    t = time.perf_counter()
    model = build_model(args.shape, getattr(torch, args.dtype), args.device)
    record("build", seconds=round(time.perf_counter() - t, 2))
    settings = Settings(context_length=args.context_length, dtype=args.dtype, device=args.device)
    data = CalibrationSet(tok, settings)

    t = time.perf_counter()
    calib = [ev for ev in data.evaluators(model, "calibration", settings.sinks) if ev is not None]
    valid = s.Suite(*data.evaluators(model, "validation", settings.sinks))
    record("prefill", seconds=round(time.perf_counter() - t, 2))

    grid = list(profiling.GRID)
    windows = [w for w in profiling.PROFILED_WINDOWS if w <= 64]
    t = time.perf_counter()
    recall = profiling.attention_recall(model, calib[0], settings.sinks, settings.window, Selection(), grid, windows)
    record("attention_recall", seconds=round(time.perf_counter() - t, 2))

    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    n = min(args.sample_layers, layers)
    sample = sorted({round(i * (layers - 1) / max(n - 1, 1)) for i in range(n)})
    mask = [i in sample for i in range(layers)]
    base = Schedule(ratios=[1.0] * layers, window=settings.window, sinks=settings.sinks)
    t = time.perf_counter()
    parts = profiling.single_layer_kl(calib, base, mask, grid)
    each_layer = (time.perf_counter() - t) / len(sample)
    record("layer_curves", sampled_layers=sample, seconds_per_curve=round(each_layer, 3),
           predicted_seconds=round(each_layer * layers, 1))  # fmt: skip
    t = time.perf_counter()
    points = check_points(settings.head_points, grid)  # as calibrate run measures them: at its default points
    measured = profiling.single_layer_kl(calib, base, mask, [grid[g] for g in points], heads=heads)
    head_parts = from_layer_shape(parts, measured, grid, points)
    each_head = (time.perf_counter() - t) / (len(sample) * heads)
    record("head_curves", sampled_layers=sample, head_points=settings.head_points,
           seconds_per_curve=round(each_head, 3), predicted_seconds=round(each_head * layers * heads, 1))  # fmt: skip

    # --head-curves fisher: the gradient samples do not depend on the layers estimated, each layer's changes do
    t = time.perf_counter()
    fisher_kl(calib, base, sample, grid, heads)
    whole = time.perf_counter() - t
    t = time.perf_counter()
    for ev in calib:
        for b in range(len(ev.batches)):
            sampled_gradients(ev, b, SAMPLES, torch.Generator().manual_seed(0), lambda grads: None)
    gradients = time.perf_counter() - t
    per_layer = max(whole - gradients, 0.0) / len(sample)
    predicted_fisher = round(gradients + per_layer * layers, 1)
    record("fisher_head_curves", sampled_layers=sample, samples=SAMPLES, gradient_seconds=round(gradients, 2),
           seconds_per_layer=round(per_layer, 3), predicted_seconds=predicted_fisher)  # fmt: skip

    # the search needs whole curves: unsampled layers take the sampled mean (the values are meaningless anyway)
    fill = parts[:, mask].mean(1, keepdim=True)
    parts = torch.where(torch.tensor(mask)[None, :, None], parts, fill)
    head_parts = torch.where(torch.tensor(mask)[None, :, None, None], head_parts, head_parts[:, mask].mean(1, True))
    prof = profiling.Profile(grid=grid, windows=windows, recall=recall[0], overlap=recall[1], window_recall=recall[2],
                             sensitivity=parts.mean(0), compressible=[True] * layers, parts=parts,
                             part_names=["text", "retrieval"], head_parts=head_parts)  # fmt: skip
    space = s.Space(0.3, settings.context_length, prof, model_info(model, name=args.shape), settings.sinks,
                    list(s.SEARCH_WINDOWS), settings.window)  # fmt: skip
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # used on purpose
    study = s.create_study(None, "timing", seed=0)
    s.enqueue_baselines(study, settings.window, heads=True)
    t = time.perf_counter()
    study.optimize(s.objective_fn(space, valid), n_trials=args.trials)
    each_trial = (time.perf_counter() - t) / args.trials
    record("search", trials=args.trials, seconds_per_trial=round(each_trial, 2))

    p_ = result["parts"]
    predicted = (p_["prefill"]["seconds"] + p_["attention_recall"]["seconds"] + p_["layer_curves"]["predicted_seconds"]
                 + p_["head_curves"]["predicted_seconds"] + each_trial * DEFAULT_TRIALS)  # fmt: skip
    result["predicted_calibrate_run_seconds"] = round(predicted, 1)
    fisher = predicted - p_["head_curves"]["predicted_seconds"] + p_["fisher_head_curves"]["predicted_seconds"]
    result["predicted_calibrate_run_seconds_fisher"] = round(fisher, 1)
    result["peak_memory_bytes"] = _peak(args.device)
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"predicted calibrate run (--context-length {args.context_length}, {DEFAULT_TRIALS} trials): "
          f"{predicted / 60:.1f} min ({fisher / 60:.1f} min with --head-curves fisher); "
          f"peak GPU memory {result['peak_memory_bytes']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
