"""`calibrate eval`: quality against KV memory for calibrated schedules and baselines, on held-out data.

Tasks: `lm` (WikiText-2 test windows: KL to the full cache and perplexity), `longbench` (LongBench-E rows, official
prompts, answer lengths and metrics, plus the NLL of the gold answer), `needle` (access codes hidden in Gutenberg
prose at several depths and prompt lengths). Methods: the full cache, uniform, PyramidKV, PyramidInfer,
StreamingLLM (uniform, most recent tokens) and random selection at each budget, plus the schedule files given
with --schedule, used as they are (their budget joins --budgets, so every reference is also built at it; the
references take sinks, window and selection settings from the first file, so only the allocation differs). A
reference keeps exactly its budget at the prompt length it runs at (a batch's mean length); the KV fraction
actually kept is measured and reported for every sample.

Results go to OUT_DIR/results.json (per-sample records, mean and 95% bootstrap CI per method, budget, task and
dataset / length / depth), results.md (the tables printed at the end) and PNG plots. The run is resumable: what
results.json already holds is never recomputed, and it is rewritten (atomically) after every batch and method.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

ORDER = 30

EXAMPLES = """\
examples:
  calibrate eval --quick                                   # SmolLM2, budget 0.3, small sizes (a few minutes)
  calibrate eval --schedule schedules/smollm2-135m-instruct_b0.3.json --out-dir runs/eval_smollm2
  calibrate eval --budgets 0.2,0.3,0.5 --tasks lm,needle   # the full preset on two tasks
  calibrate eval --methods full,uniform,pyramidkv --modes evict,drop --tasks lm
  calibrate eval --tasks needle --question-after-compression --needle-lengths 1024,2048
  calibrate eval --tasks longbench --datasets hotpotqa,lcc --samples 4 --pick spread
  calibrate eval --model gemma3-270m --quick --dtype bfloat16

Presets: the default (full) preset runs WikiText-2 8 windows of 2048 + 128 tokens, the 6 shortest LongBench-E rows
per dataset (answers capped at 128 tokens, which cuts only gov_report's 512), needles at 1024/2048/4096 tokens and
depths 0/25/50/75/100% (3 variants each), for budgets 0.2,0.3,0.5: about 50 minutes on 2 CPU cores (SmolLM2,
--threads 1). --quick: 4 windows of 1024 + 128, 2 rows per dataset with prompts cut to 2048 tokens and answers to
64 tokens, needles at 1024/2048 tokens and depths 0/50/100%, budget 0.3: about 7 minutes. Any option below
overrides the preset.
"""


def _floats(text: str, what: str) -> list[float]:
    from ..evaluation import EvalError

    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise EvalError(f"{what} '{part}' is not a number; give a comma-separated list like 0.2,0.3,0.5") from None
    if not out:
        raise EvalError(f"no {what}s given")
    return out


def _ints(text: str, what: str) -> tuple[int, ...]:
    from ..evaluation import EvalError

    values = _floats(text, what)
    if any(v != int(v) or v < 0 for v in values):
        raise EvalError(f"{what}s must be whole numbers >= 0, got {text}")
    return tuple(int(v) for v in values)


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_parser(subparsers):
    from ..options import DEVICE_MAP_HELP

    p = subparsers.add_parser(
        "eval",
        help="quality against KV memory: calibrated schedules vs baselines on WikiText-2, LongBench-E, needles",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="hub id, model folder or .gguf file (default: the embedded SmolLM2-135M)")
    p.add_argument("--schedule", nargs="+", default=[], metavar="FILE", help="calibrated schedule files to evaluate")
    p.add_argument("--budgets", help="mean KV fractions for the reference methods (default 0.2,0.3,0.5; quick 0.3)")
    p.add_argument(
        "--methods",
        default="full,uniform,pyramidkv,pyramidinfer,streamingllm,random",
        help="comma-separated: full, uniform, pyramidkv, pyramidinfer, streamingllm, random (default: all)",
    )
    p.add_argument("--modes", default="evict", help="prefill modes: evict, drop or evict,drop (default evict)")
    p.add_argument("--tasks", default="lm,longbench,needle", help="comma-separated: lm, longbench, needle")
    p.add_argument("--quick", action="store_true", help="the small preset (see below)")
    p.add_argument("--out-dir", help="where results go (default runs/eval_MODEL, runs/eval_MODEL_quick)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--device-map", help=DEVICE_MAP_HELP)
    p.add_argument("--data-dir", help="the shared data folder (default ../shared/data or $PYRAMIDINFER_DATA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; 1 is much faster when "
                   "another job shares the cores)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--batch-size", type=int, default=8,
                   help="LongBench and needle prompts decoded together, left-padded (default 8)")  # fmt: skip
    lm = p.add_argument_group("language modelling (WikiText-2 test)")
    lm.add_argument("--lm-context", type=int, help="tokens compressed per window (default 2048; quick 1024)")
    lm.add_argument("--lm-continuation", type=int, help="tokens scored after it (default 128)")
    lm.add_argument("--lm-windows", type=int, help="windows (default 8; quick 4)")
    lb = p.add_argument_group("LongBench-E")
    lb.add_argument("--datasets", help="comma-separated (default: qasper,multifieldqa_en,hotpotqa,2wikimqa,"
                    "gov_report,triviaqa,passage_count,lcc)")  # fmt: skip
    lb.add_argument("--samples", type=int, help="rows per dataset (default 6; quick 2)")
    lb.add_argument("--pick", choices=["shortest", "spread"], help="which rows: the shortest (default) or spread")
    lb.add_argument("--max-prompt-tokens", type=int, help="middle-truncate prompts to this (default: model window)")
    lb.add_argument("--max-new-tokens", type=int,
                    help="cap LongBench's answer lengths (default 128, which cuts only gov_report's 512; quick 64; "
                    "0: the official lengths)")  # fmt: skip
    lb.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap prompts in the tokenizer's chat template (default: when it has one)")  # fmt: skip
    nd = p.add_argument_group("needle retrieval (Gutenberg haystacks)")
    nd.add_argument("--needle-lengths", help="prompt lengths in tokens (default 1024,2048,4096; quick 1024,2048)")
    nd.add_argument("--needle-depths", help="needle depths in percent (default 0,25,50,75,100; quick 0,50,100)")
    nd.add_argument("--needle-variants", help="single, multikey, multivalue (default: all three)")
    nd.add_argument("--needle-reps", type=int, help="prompts per variant and cell (default 1)")
    nd.add_argument("--question-after-compression", action="store_true",
                    help="compress the haystack first, then feed the question (instead of the question in the "
                    "compressed prompt)")  # fmt: skip
    nd.add_argument("--needle-questions", help="in-prompt, after-compression or both (comma-separated)")
    p.set_defaults(func=run)
    return p


def settings_from(args):
    from pathlib import Path

    from ..evaluation import EvalError, Settings

    over = {}
    if args.data_dir:
        over["data_dir"] = Path(args.data_dir)
    for name in ("lm_context", "lm_continuation", "lm_windows", "samples", "max_prompt_tokens", "max_new_tokens",
                 "needle_reps"):  # fmt: skip
        v = getattr(args, name)
        if v is not None:
            if name == "max_new_tokens" and v == 0:
                over[name] = None  # the official answer lengths
                continue
            if v < 1:
                raise EvalError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
            over[name] = v
    if args.pick:
        over["pick"] = args.pick
    if args.chat_template is not None:
        over["chat_template"] = args.chat_template
    if args.datasets:
        over["datasets"] = tuple(_names(args.datasets))
    if args.needle_lengths:
        over["needle_lengths"] = _ints(args.needle_lengths, "needle length")
    if args.needle_depths:
        over["needle_depths"] = _ints(args.needle_depths, "needle depth")
    if args.needle_variants:
        over["needle_variants"] = tuple(_names(args.needle_variants))
    questions = _names(args.needle_questions) if args.needle_questions else []
    if "both" in questions:
        questions = ["in-prompt", "after-compression"]
    if args.question_after_compression and "after-compression" not in questions:
        questions.append("after-compression")
    if questions:
        over["needle_questions"] = tuple(questions)
    over["seed"] = args.seed
    return Settings.quick(**over) if args.quick else Settings(**over)


def run(args) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from .. import evaluation as ev
    from .. import report
    from ..models import load_model, resolve
    from ..options import set_threads

    started = time.time()
    command = shlex.join(["calibrate", *sys.argv[1:]]) if sys.argv[1:2] == ["eval"] else "calibrate eval"
    tasks = _names(args.tasks)
    unknown = [t for t in tasks if t not in ev.TASKS]
    if unknown or not tasks:
        raise ev.EvalError(f"unknown task '{unknown[0] if unknown else ''}'; use some of {', '.join(ev.TASKS)}")
    budgets = _floats(args.budgets or ("0.3" if args.quick else "0.2,0.3,0.5"), "budget")
    for option, value in (("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ev.EvalError(f"{option} must be at least 1, got {value}")
    configs = ev.make_configs(_names(args.methods), budgets, _names(args.modes), args.schedule)
    settings = settings_from(args)
    for task in tasks:  # check the data before loading anything heavy
        settings.folder({"lm": "wikitext2_raw_test", "longbench": "longbench_e", "needle": "gutenberg"}[task])

    model_name = resolve(args.model).name
    out_dir = Path(args.out_dir or f"runs/eval_{model_name}{'_quick' if args.quick else ''}")
    meta = {
        "model": model_name,
        "dtype": args.dtype,
        "command": command,
        "task_settings": {t: settings.task_settings(t) for t in tasks},
    }
    store = ev.Store(out_dir / "results.json", meta)  # refuses results made with other settings, before loading
    store.forget_stale(configs)

    from runtime.families import check_schedule_fits
    from runtime.schedule import ScheduleError, load_schedule

    files = {path: load_schedule(path) for path in args.schedule}  # a bad file fails before the model loads
    set_threads(args.threads)
    model, tok = load_model(args.model, args.dtype, args.device, args.device_map)
    for path, schedule in files.items():  # ... and one made for another model before any baseline is computed
        try:
            check_schedule_fits(model, schedule)
        except ScheduleError as e:
            raise ev.EvalError(f"--schedule {path}: {e}") from None
    maker = ev.ScheduleMaker(model, files[args.schedule[0]] if args.schedule else None)
    print(f"model {model_name} ({args.dtype}, {model.device}); {len(configs)} configurations; results in {out_dir}")

    computed = reused = 0
    builders = {"lm": ev.LMTask, "longbench": ev.LongBenchTask, "needle": ev.NeedleTask}
    for name in tasks:
        t0 = time.time()
        task = builders[name](model, tok, settings)
        missing, total = ev.units(task, configs, store)
        reused += total - missing
        if missing == 0:
            print(f"{name}: all {total} results already in {store.path.name}")
            continue
        with tqdm(total=missing, desc=name, unit="result", dynamic_ncols=True) as bar:

            def progress(what, n, bar=bar):
                bar.set_postfix_str(str(what), refresh=False)
                bar.update(n)

            done = ev.run_task(task, configs, maker, store, batch_size=args.batch_size, progress=progress)
        computed += done
        print(f"{name}: {done} results in {time.time() - t0:.1f} s ({(time.time() - t0) / max(done, 1):.2f} s each)")

    records = list(store.records.values())
    rows = report.summarize(records)
    text = report.markdown(rows, records, command=command)
    from runtime.schedule import write_atomic

    write_atomic(out_dir / "results.md", text + "\n")
    written = [out_dir / "results.json", out_dir / "results.md"]
    if not args.no_plots:
        written += write_plots(rows, records, out_dir, model_name)
    print()
    print(text)
    print(f"computed {computed} results, reused {reused}, in {time.time() - started:.1f} s")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def write_plots(rows, records, out_dir, title):
    from .. import plots

    written = [plots.save(plots.quality_vs_kv(rows, title=title), out_dir / "quality_vs_kv.png")]
    needle = [r for r in records if r["task"] == "needle"]
    for question in sorted({r["question"] for r in needle}):
        for budget, mode in sorted({(r["budget"], r["mode"]) for r in needle if r["method"] != "full"}):
            fig = plots.needle_heatmaps(needle, budget, mode, question)
            name = f"needle_{question}_b{budget:g}_{mode}.png"
            written.append(plots.save(fig, out_dir / name))
    return written
