"""Command-line options shared by several `calibrate` commands (each command adds its own beside them)."""

from __future__ import annotations

from .errors import CalibrateError

DEVICE_MAP_HELP = (
    "spread a model larger than one device over GPUs, CPU memory and disk (accelerate): auto, balanced, "
    "sequential or a JSON file {module: device}; overrides --device"
)

THREADS_HELP = (
    "CPU threads for torch (default: torch's); with N workers on one machine give each cores/N, since "
    "oversubscribed cores slow every worker down"
)


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise CalibrateError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def add_calibration_args(p) -> None:
    """What `run`, `profile` and `search` share: model, data, profile settings, output."""
    p.add_argument("--model", help="hub id, model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--data",
        nargs="+",
        metavar="D",
        help="text files, folders, JSONL (see --text-field) or datasets names; default: generated filler only",
    )
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--context-length", type=int, help="prompt tokens per calibration window (default 1024)")
    p.add_argument("--calib-windows", type=int, help="text windows to profile on (default 3, quick 2)")
    p.add_argument("--valid-windows", type=int, help="text windows the search validates on (default 4, quick 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-per-head",
        action="store_true",
        help="measure per-layer curves only (a 3x faster profile on SmolLM2); every head of a layer then keeps the "
        "same share",
    )
    p.add_argument(
        "--head-points",
        metavar="R,R,..",
        help="grid ratios at which per-head curves are measured, the rest following the layer curve's shape "
        "(default all: 0.02,0.05,0.1,0.25,0.5); e.g. 0.02,0.1,0.5 measures 40%% less of them, for 4-14%% more "
        "held-out KL at budgets 0.2-0.3 on SmolLM2",
    )
    p.add_argument(
        "--head-curves",
        choices=["measured", "fisher"],
        help="how per-head curves are obtained: 'measured' (default), a forward per head and grid ratio; 'fisher', "
        "each measured layer curve split over its heads by a second-order estimate from a few backward passes "
        "(on SmolLM2 --quick without it took 1.95x as long as with --fisher-samples 48; held-out KL 0.97-1.10x; "
        "the default with --quick)",
    )
    p.add_argument(
        "--fisher-samples",
        type=int,
        help="gradient samples per batch of --head-curves fisher (default 48, quick 24: on SmolLM2 --quick 77 s "
        "instead of 89 s, for 4-8%% more held-out KL)",
    )
    p.add_argument(
        "--profile-continuation",
        type=int,
        metavar="N",
        help="the profile scores only the first N tokens of each text window's continuation (default: all of them, "
        "128, or 64 under --quick; N must be fewer); on SmolLM2 64 make each measurement 0.68x as long, for "
        "held-out KL within 3%% at budgets 0.2-0.3 and 8-11%% more at 0.5",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--device-map", help=DEVICE_MAP_HELP)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument(
        "--quick", action="store_true", help="small preset (512-token windows, fewer of them, --head-curves fisher)"
    )
    p.add_argument("--out", default=None, help="schedule file to write (default: runs/MODEL_bBUDGET.json)")


def add_search_args(p) -> None:
    """What `run` and `search` share: the budget(s), the trial budget and the study."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=float, help="mean KV fraction to meet (default 0.3)")
    g.add_argument("--budgets", help="several budgets, comma separated: a multi-objective (NSGA-II) search")
    p.add_argument("--trials", type=int, help="trials in the study, counting finished ones (default 40, quick 12)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite file beside --out)")
    p.add_argument("--study-name", help="study name (default: from model, budget and settings)")
    p.add_argument(
        "--no-search",
        action="store_true",
        help="skip Optuna: water-fill the budget on the profile's sensitivity curves (seconds after the profile)",
    )
    p.add_argument(
        "--warm-start",
        nargs="+",
        metavar="SCHEDULE",
        help="schedule files written by an earlier calibration: their search parameters are tried first, beside "
        "the baselines (recalibrating after an upgrade then never loses the old best on validation)",
    )


def add_profile_workers_arg(p) -> None:
    """What `run` and `profile` add: how many processes measure the curves (`unit_pool`)."""
    p.add_argument(
        "--profile-workers",
        type=int,
        metavar="N",
        help="processes that measure the profile's sensitivity curves on the CPU, on one thread each, at most "
        "--threads (default on Linux: one per thread, up to 8; 1 on a GPU); on 2 cores 2 workers measured "
        "SmolLM2's head curves 1.08x as fast as one process on 2 threads",
    )
