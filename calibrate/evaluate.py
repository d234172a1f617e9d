"""Quality against KV memory on data calibration never saw: language modelling, LongBench-E and needle retrieval.

Every task prefills a prompt once with the full cache and, for each schedule, forks that cache and compresses it
(evict mode: the same tokens a prefill under the schedule would keep, see `Evaluator`); drop mode prefills under
the schedule itself. The result of every (sample, schedule) is a plain dict: a per-sample record.

    from calibrate.evaluate import Settings, LongBenchTask
    from runtime.reference import at_budget
    task = LongBenchTask(model, tok, Settings())
    samples = task.samples("hotpotqa")
    records = task.run(samples, {"full": None, "uniform": at_budget("uniform", 30, 0.3, prompt_tokens=2000)})

`None` in place of a schedule is the full cache. Prompts run in left-padded batches (`batch_size`); the command
(`calibrate eval`) builds each reference schedule at its batch's mean prompt length, so it keeps the budget there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import runtime
from runtime.families import layer_plan, model_info
from runtime.reference import at_budget
from runtime.schedule import Schedule, ScheduleError, Selection, load_schedule

from . import metrics
from .errors import CalibrateError
from .evaluator import row_scores
from .paths import shared_data

TASKS = ("lm", "longbench", "needle")
METHODS = ("full", "uniform", "pyramidkv", "pyramidinfer", "streamingllm", "random")
REFERENCE_KIND = {"uniform": "uniform", "pyramidkv": "pyramidkv", "pyramidinfer": "pyramidinfer"}
SELECTION_BASELINES = {"streamingllm": "recent", "random": "random"}  # uniform ratios, another selection
MODES = ("evict", "drop")

LONGBENCH_DATASETS = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "triviaqa",
    "passage_count",
    "lcc",
)
# LongBench's pred.py leaves these prompts unwrapped for chat models (few-shot and code completion)
NO_CHAT_TEMPLATE = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
NEEDLE_VARIANTS = ("single", "multikey", "multivalue")
QUESTION_SETTINGS = ("in-prompt", "after-compression")


class EvalError(CalibrateError):
    pass


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    """What the tasks read and how big they are. `quick()` gives the small preset."""

    data_dir: Path = field(default_factory=shared_data)
    seed: int = 0
    # language modelling (WikiText-2 test)
    lm_context: int = 2048
    lm_continuation: int = 128
    lm_windows: int = 8
    lm_batch: int = 4
    # LongBench-E
    datasets: tuple[str, ...] = LONGBENCH_DATASETS
    samples: int = 6  # per dataset: 8 would take about an hour on 2 CPU cores with 16 configurations
    pick: str = "shortest"  # "shortest" rows first, or "spread" over the length range
    max_prompt_tokens: int | None = None  # middle-truncate prompts to this (default: the model's window)
    max_new_tokens: int | None = 128  # cap on LongBench's answer lengths (dataset2maxlen.json); 128 cuts only
    # gov_report's 512 (on 2 CPU cores its 16 schedules x 512 steps alone would take about half an hour)
    chat_template: bool | None = None  # None: use the tokenizer's chat template when it has one
    # needle retrieval in Gutenberg text
    needle_lengths: tuple[int, ...] = (1024, 2048, 4096)
    needle_depths: tuple[int, ...] = (0, 25, 50, 75, 100)  # percent
    needle_variants: tuple[str, ...] = NEEDLE_VARIANTS
    needle_reps: int = 1
    needle_questions: tuple[str, ...] = ("in-prompt",)

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        small = dict(
            lm_context=1024,
            lm_continuation=128,
            lm_windows=4,
            samples=2,
            max_prompt_tokens=2048,
            max_new_tokens=64,
            needle_lengths=(1024, 2048),
            needle_depths=(0, 50, 100),
        )
        return cls(**{**small, **overrides})

    def task_settings(self, task: str) -> dict[str, Any]:
        """The settings a task's results depend on (a resumed run must use the same)."""
        names = {
            "lm": ("seed", "lm_context", "lm_continuation", "lm_windows"),
            "longbench": ("pick", "max_prompt_tokens", "max_new_tokens", "chat_template"),
            "needle": ("seed", "needle_reps"),
        }[task]
        return {n: getattr(self, n) for n in names}

    def folder(self, name: str) -> Path:
        path = Path(self.data_dir) / name
        if not path.is_dir():
            raise EvalError(f"data folder '{path}' does not exist; pass --data-dir with the shared data folder")
        return path


# ---------------------------------------------------------------- methods and schedules


@dataclass(frozen=True)
class Config:
    """One column of the comparison: a method at a budget in a prefill mode."""

    method: str  # full | uniform | pyramidkv | pyramidinfer | streamingllm | random | a schedule file's label
    budget: float  # mean KV fraction (1 for full; a schedule file's own budget)
    mode: str = "evict"
    path: str | None = None  # schedule file (calibrated), used as it is
    digest: str = ""  # what the schedule is made of: a stored result made from anything else is stale

    @property
    def key(self) -> str:
        return f"{self.method}@{self.budget:g}/{self.mode}"

    @property
    def is_full(self) -> bool:
        return self.method == "full"


def file_label(path: str | Path, schedule: Schedule) -> str:
    return schedule.name or Path(path).stem


def schedule_digest(schedule: Schedule, settings_only: bool = False) -> str:
    """Hash of what a schedule does (not its provenance); `settings_only`: without ratios, budget and name,
    which is what the reference methods borrow from the first calibrated schedule."""
    drop = {"provenance", "ratios", "budget", "name", "context_length"} if settings_only else {"provenance"}
    body = {k: v for k, v in schedule.to_dict().items() if k not in drop}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def schedule_budget(schedule: Schedule) -> float:
    b = schedule.budget if schedule.budget is not None else schedule.kv_fraction(schedule.context_length)
    return round(float(b), 4)


def make_configs(
    methods: Sequence[str], budgets: Sequence[float], modes: Sequence[str], files: Sequence[str] = ()
) -> list[Config]:
    """Full cache once; each reference method at each budget and mode; each schedule file at its own budget.

    A schedule file's budget joins the budgets, so the references are also built at it.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise EvalError(f"unknown method '{unknown[0]}'; use some of {', '.join(METHODS)}")
    for m in modes:
        if m not in MODES:
            raise EvalError(f"unknown prefill mode '{m}'; use evict, drop or evict,drop")
    for b in budgets:
        if not (isinstance(b, (int, float)) and math.isfinite(b) and 0.0 < b <= 1.0):
            raise EvalError(f"budget {b} is outside (0, 1]; give mean KV fractions such as 0.2,0.3,0.5")
    loaded = []
    for path in files:
        schedule = load_schedule(path)
        loaded.append((path, schedule))
    all_budgets = sorted({round(float(b), 4) for b in budgets} | {schedule_budget(s) for _, s in loaded})
    configs: list[Config] = []
    if "full" in methods:
        configs.append(Config("full", 1.0, "evict"))
    borrowed = schedule_digest(loaded[0][1], settings_only=True) if loaded else ""  # see ScheduleMaker
    for mode in modes:
        for b in all_budgets:
            configs += [Config(m, b, mode, digest=borrowed) for m in methods if m != "full" and b < 1.0]
        for path, schedule in loaded:
            label, budget = file_label(path, schedule), schedule_budget(schedule)
            configs.append(Config(label, budget, mode, str(path), schedule_digest(schedule)))
    keys = [c.key for c in configs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise EvalError(f"two schedules share the label '{dup}'; give the files different names")
    return configs


class ScheduleMaker:
    """Builds each config's schedule for a prompt length (references exactly at the budget at that length).

    Reference methods take their sinks, window, selection and decode settings from `base` (the first calibrated
    schedule, so only the allocation differs), or the Schedule defaults.
    """

    def __init__(self, model, base: Schedule | None = None):
        self.model = model
        self.info = model_info(model)
        self.layers = self.info.num_layers
        self.base = base
        self._cache: dict[tuple[str, int], Schedule | None] = {}
        self._files: dict[str, Schedule] = {}

    def settings(self) -> dict[str, Any]:
        if self.base is None:
            return {}
        b = self.base
        return dict(
            sinks=b.sinks,
            window=b.window,
            selection=dataclasses.replace(b.selection),
            decode=dataclasses.replace(b.decode),
        )

    def schedule(self, config: Config, prompt_tokens: int) -> Schedule | None:
        key = (config.key, prompt_tokens)
        if key not in self._cache:
            self._cache[key] = self._build(config, prompt_tokens)
        return self._cache[key]

    def _build(self, config: Config, n: int) -> Schedule | None:
        if config.is_full:
            return None
        if config.path is not None:
            if config.path not in self._files:
                self._files[config.path] = load_schedule(config.path)
            s = self._files[config.path]
            return dataclasses.replace(s, prefill_mode=config.mode)
        kw = self.settings()
        kw["model"] = self.info
        kw["prefill_mode"] = config.mode
        kw["name"] = config.method
        if config.method in SELECTION_BASELINES:
            selection = kw.get("selection") or Selection()
            kw["selection"] = dataclasses.replace(selection, method=SELECTION_BASELINES[config.method])
            kind = "uniform"
        else:
            kind = REFERENCE_KIND[config.method]
        try:
            return at_budget(kind, self.layers, config.budget, prompt_tokens=n, **kw)
        except ScheduleError as e:
            raise EvalError(f"{config.key} at {n} prompt tokens: {e}") from None


def max_window(schedules: Sequence[Schedule | None]) -> int:
    return max([s.window for s in schedules if s is not None] + [32])


# ---------------------------------------------------------------- prefill once, fork per schedule


def eos_ids(model, tok) -> list[int]:
    ids: list[int] = []
    for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if src is None:
            continue
        ids += [int(i) for i in (src if isinstance(src, (list, tuple)) else [src])]
    return sorted(set(ids))


def kv_fraction(cache, plan: list[tuple[bool, int | None]], prompt_tokens: int) -> float:
    """Measured KV slots of the compressible layers over the full cache, right after compression (batch 1)."""
    return row_kv_fractions(cache, plan, [prompt_tokens])[0]


def row_kv_fractions(cache, plan: list[tuple[bool, int | None]], prompt_tokens: Sequence[int]) -> list[float]:
    """Per row: real tokens kept (valid slots, averaged over KV heads) in the compressible layers over the full
    cache of that row's prompt. Padding slots do not count."""
    layers = [i for i, (compressible, _) in enumerate(plan) if compressible]
    if not layers:
        return [1.0] * len(prompt_tokens)
    kept = sum(runtime.inspect.kept_per_row(cache, i) for i in layers) / len(layers)  # [B]
    return [round(float(k) / n, 6) for k, n in zip(kept.tolist(), prompt_tokens)]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids, left-padded into ids [B, T] and an attention mask [B, T]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows (pads get 0), as `generate` computes them from the attention mask.

    Every call here passes them explicitly: under runtime.apply `generate` does not compute any (the patched
    forward hides its signature), and the runtime's own default counts pads, so a row would be shifted by its
    padding in one call and not in the next.
    """
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


class Prefix:
    """Prompts (a left-padded batch) prefilled once with the full cache; `compressed` gives any schedule's cache.

    Evict mode forks the full cache and trims it (what a prefill under the schedule keeps); drop mode runs its
    own prefill under the schedule. Either way the log-probabilities of each row's next token come with it.
    """

    def __init__(self, model, rows: Sequence[Sequence[int]] | torch.Tensor, query_window: int = 64, pad_id: int = 0):
        if isinstance(rows, torch.Tensor):
            rows = [rows.tolist()] if rows.dim() == 1 else rows.tolist()
        self.model = model
        self.lengths = [len(r) for r in rows]
        if min(self.lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        ids, mask = left_pad(rows, pad_id)
        self.ids, self.mask = ids.to(model.device), mask.to(model.device)
        self.padded = min(self.lengths) < ids.shape[1]
        self.layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.plan = layer_plan(model)
        self.probe = Schedule(ratios=[1.0] * self.layers, window=query_window, sinks=4, name="full")
        self._cache = None
        self._last_logp: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        """Mean prompt length (the length reference schedules are built at)."""
        return round(sum(self.lengths) / len(self.lengths))

    def _inputs(self) -> dict[str, torch.Tensor]:
        # explicit positions, counted over each row's real tokens, here and in every later call (see mask_positions)
        return {"attention_mask": self.mask, "position_ids": mask_positions(self.mask)} if self.padded else {}

    def _prefill(self, schedule: Schedule):
        with torch.inference_mode(), runtime.apply(self.model, schedule):
            out = self.model(self.ids, logits_to_keep=1, **self._inputs())
        return out.cache, torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def full(self):
        if self._cache is None:
            self._cache, self._last_logp = self._prefill(self.probe)
        return self._cache, self._last_logp

    def compressed(self, schedule: Schedule | None) -> tuple[Schedule, Any, torch.Tensor, list[float]]:
        """(schedule to run under, compressed cache, log-probs of each row's next token [B, V], KV fraction per row)."""
        if schedule is not None and schedule.prefill_mode == "drop":
            cache, logp = self._prefill(schedule)
        else:
            full, logp = self.full()
            if schedule is None:
                schedule = self.probe
            if schedule.window > self.probe.window:
                raise EvalError(f"schedule window {schedule.window} exceeds the probe's {self.probe.window}")
            cache = full.fork(schedule)
            cache.compress_now()
        return schedule, cache, logp, row_kv_fractions(cache, self.plan, self.lengths)


def _cut(tokens: list[int], eos: Sequence[int], limit: int) -> list[int]:
    tokens = tokens[:limit]
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def generate_after(
    model,
    prefix: Prefix,
    schedule: Schedule,
    cache,
    logp: torch.Tensor,
    extra: torch.Tensor | None,
    max_new: int | Sequence[int],
    eos: Sequence[int],
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy answers after the compressed prefix, per row (each cut after its first EOS and at its `max_new`).

    `extra` [B, Q] (or [Q] for one row) is fed after compression first (the question, when it comes after the
    compressed prompt); without it the first token comes from the prefill logits (in evict mode those are the full
    cache's, since compression happens after the prompt's attention). Rows run together under `generate`.
    """
    b = prefix.ids.shape[0]
    limits = [max_new] * b if isinstance(max_new, int) else list(max_new)
    steps = max(limits)
    if steps < 1:
        return [[] for _ in range(b)]
    device = prefix.ids.device
    if extra is not None and extra.dim() == 1:
        extra = extra[None].expand(b, -1)
    first: list[list[int]] = [[] for _ in range(b)]
    if extra is None or extra.shape[1] == 0:
        top = logp.argmax(-1)
        first = [[int(t)] for t in top]
        if steps == 1:
            return [_cut(f, eos, n) for f, n in zip(first, limits)]
        feed, steps = top[:, None].to(device), steps - 1
    else:
        feed = extra.to(device)
    full = torch.cat([prefix.ids, feed], dim=1)
    mask = torch.cat([prefix.mask, torch.ones_like(feed)], dim=1)
    with torch.inference_mode(), runtime.apply(model, schedule):
        out = model.generate(
            full,
            attention_mask=mask,  # without it, generate under runtime.apply re-feeds the whole prompt
            position_ids=mask_positions(mask),
            cache=cache,
            max_new_tokens=steps,
            do_sample=False,
            num_beams=1,
            eos_token_id=list(eos) or None,
            pad_token_id=pad_id,
        )
    new = out[:, full.shape[1] :].tolist()
    return [_cut(f + row, eos, n) for f, row, n in zip(first, new, limits)]


def answer_nll(
    model, prefix: Prefix, schedule: Schedule, cache, logp: torch.Tensor, extra: torch.Tensor | None, answers
) -> list[float]:
    """Per row: mean NLL per answer token, teacher-forced after the compressed prefix (and `extra` [B, Q]), each
    row's extra + answer fed in one chunk (right-padded across rows). NaN for an empty answer."""
    b = prefix.ids.shape[0]
    answers = [torch.as_tensor(a, dtype=torch.long) for a in answers]
    q = 0 if extra is None else extra.shape[-1]
    if extra is not None and extra.dim() == 1:
        extra = extra[None].expand(b, -1)
    width = q + max(a.numel() for a in answers)
    if width == 0:
        return [float("nan")] * b
    feed = torch.zeros(b, width, dtype=torch.long)
    fmask = torch.zeros(b, width, dtype=torch.long)
    for i, a in enumerate(answers):
        row = torch.cat([extra[i].cpu(), a]) if q else a
        feed[i, : row.numel()] = row
        fmask[i, : row.numel()] = 1
    device = prefix.ids.device
    mask = torch.cat([prefix.mask, fmask.to(device)], dim=1)
    positions = prefix.mask.sum(-1, keepdim=True) + torch.arange(width, device=device)[None]
    with torch.inference_mode(), runtime.apply(model, schedule):
        logits = model(feed.to(device), attention_mask=mask, position_ids=positions, cache=cache).logits
    lp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, a in enumerate(answers):
        k = a.numel()
        if k == 0:
            out.append(float("nan"))
            continue
        nll = []
        if q == 0:  # the first answer token is predicted by the prefill
            nll.append(-float(logp[i, a[0]]))
            rows, targets = lp[i, : k - 1], a[1:]
        else:
            rows, targets = lp[i, q - 1 : q - 1 + k], a
        if targets.numel():
            nll += (-rows.gather(-1, targets.to(rows.device)[:, None])[:, 0]).tolist()
        out.append(sum(nll) / len(nll))
    return out


def batches_by_length(items: Sequence[Any], length, size: int, waste: float = 1.0) -> list[list[Any]]:
    """Items sorted by length, cut into batches of at most `size` whose left padding adds at most `waste` times
    the real tokens (a long outlier gets a batch of its own), then evened out.

    Padding costs prefill once per batch, while every batch costs decoding once per schedule: on CPU fewer,
    fuller batches are cheaper even with a fair amount of padding.
    """
    out: list[list[Any]] = []
    for item in sorted(items, key=length):
        if out and len(out[-1]) < size:
            batch = out[-1]
            real = sum(length(x) for x in batch) + length(item)
            if (len(batch) + 1) * length(item) <= (1 + waste) * real:
                batch.append(item)
                continue
        out.append([item])
    # even out consecutive batches that were cut by size only (9 items, size 8: 4 + 5, not 8 + 1)
    merged: list[list[Any]] = []
    for batch in out:
        if merged and len(merged[-1]) == size and len(batch) < size:
            both = merged.pop() + batch
            half = len(both) // 2
            merged += [both[:half], both[half:]]
        else:
            merged.append(batch)
    return merged


# ---------------------------------------------------------------- language modelling


@dataclass
class LMSample:
    id: str
    index: int


class LMTask:
    """WikiText-2 test windows: compress the first `lm_context` tokens, score the next `lm_continuation`.

    Per window: KL(full || compressed) per token and NLL (perplexity = exp of the mean NLL), via `Evaluator`.
    """

    name = "lm"

    def __init__(self, model, tok, settings: Settings, windows: torch.Tensor | None = None):
        """`windows` [N, lm_context + lm_continuation] replaces the WikiText-2 windows (tests, other text)."""
        from . import data

        self.model, self.tok, self.settings = model, tok, settings
        self.evaluator = None
        s = settings
        if windows is not None:
            self.windows = windows
            return
        limit = model.config.get_text_config(decoder=True).max_position_embeddings
        if s.lm_context + s.lm_continuation > limit:
            raise EvalError(
                f"LM windows of {s.lm_context} + {s.lm_continuation} tokens exceed the model's {limit} positions; "
                "lower --lm-context"
            )
        path = settings.folder("wikitext2_raw_test") / "wiki.test.raw"
        if not path.is_file():
            raise EvalError(f"'{path}' is missing; pass --data-dir with the shared data folder")
        stream = data.token_stream(tok, data.load_texts([path]))
        self.windows = data.cut_windows(stream, s.lm_context + s.lm_continuation, s.lm_windows, seed=s.seed)

    @property
    def prompt_tokens(self) -> int:
        return self.settings.lm_context

    def groups(self) -> list[str]:
        return ["wikitext2"]

    def samples(self, group: str = "wikitext2") -> list[LMSample]:
        return [LMSample(f"w{i}", i) for i in range(len(self.windows))]

    def _evaluator(self, query_window: int):
        from .evaluator import Evaluator
        from .tasks import text_examples

        if self.evaluator is None or self.evaluator.query_window < query_window:
            examples = text_examples(self.windows, self.settings.lm_context)
            self.evaluator = Evaluator(self.model, examples, query_window=max(64, query_window),
                                       batch_size=self.settings.lm_batch)  # fmt: skip
        return self.evaluator

    def run_all(self, schedule: Schedule | None, query_window: int = 64) -> list[dict[str, Any]]:
        """Per-window records for one schedule (None: the full cache)."""
        ev = self._evaluator(max(query_window, schedule.window if schedule else 0))
        plan = layer_plan(self.model)
        if schedule is None:
            schedule = ev.probe
        records: list[dict[str, Any]] = []
        with torch.inference_mode(), runtime.apply(self.model, schedule):
            for b, idx in enumerate(ev.batches):
                if schedule.prefill_mode == "drop":
                    ctx = torch.stack([ev.examples[j].context for j in idx]).to(self.model.device)
                    cache = self.model(ctx, logits_to_keep=1).cache
                else:
                    cache = ev.compressed_cache(b, schedule)
                kv = row_kv_fractions(cache, plan, [ev.context_length] * len(idx))
                logp = ev._continuation_logprobs(idx, schedule, cache)
                ref = ev.reference[b]
                for row, j in enumerate(idx):
                    kl, nll, _ = row_scores(ev.examples[j], logp[row], ref[row])
                    records.append(
                        {"id": f"w{j}", "kl": float(kl.mean()), "nll": float(nll.mean()), "kv_fraction": kv[row]}
                    )
        return records


# ---------------------------------------------------------------- LongBench-E


def middle_truncate(ids: Sequence[int], max_tokens: int) -> list[int]:
    """Keep the first and last halves when `ids` is longer than `max_tokens` (LongBench's truncation)."""
    ids = list(ids)
    if max_tokens < 2:
        raise ValueError(f"max_tokens {max_tokens} is too small to keep both ends")
    if len(ids) <= max_tokens:
        return ids
    head = max_tokens // 2
    return ids[:head] + ids[len(ids) - (max_tokens - head) :]


def load_longbench_config(folder: Path) -> tuple[dict[str, str], dict[str, int]]:
    try:
        prompts = json.loads((folder / "config" / "dataset2prompt.json").read_text())
        maxlen = json.loads((folder / "config" / "dataset2maxlen.json").read_text())
    except FileNotFoundError as e:
        raise EvalError(f"LongBench config '{e.filename}' is missing; pass --data-dir with the shared data") from None
    return prompts, maxlen


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


@dataclass
class LongBenchSample:
    id: str
    dataset: str
    row: dict[str, Any]
    ids: list[int]  # prompt tokens (truncated, wrapped)
    answer_prefix: str  # put before the gold answer when it is teacher-forced
    max_new: int
    truncated: bool

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


def pick_rows(rows: list[dict[str, Any]], count: int, pick: str, length=None) -> list[dict[str, Any]]:
    """`count` rows: the shortest or spread evenly over the sorted lengths (`length(row)`, default LongBench's
    word count)."""
    length = length or (lambda r: r.get("length", 0))
    ordered = sorted(rows, key=lambda r: (length(r), r.get("_id", "")))
    if count >= len(ordered):
        return ordered
    if pick == "shortest":
        return ordered[:count]
    if pick == "spread":
        if count == 1:
            return [ordered[len(ordered) // 2]]
        return [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)]
    raise EvalError(f"unknown --pick '{pick}'; use shortest or spread")


class LongBenchTask:
    """LongBench-E rows with the official prompts and answer lengths, greedy answers scored with LongBench's
    metrics, plus the NLL of the first gold answer teacher-forced after the compressed prompt."""

    name = "longbench"

    def __init__(self, model, tok, settings: Settings):
        self.model, self.tok, self.settings = model, tok, settings
        self.folder = settings.folder("longbench_e")
        self.prompts, self.maxlen = load_longbench_config(self.folder)
        for d in settings.datasets:
            if metrics.dataset_name(d) not in metrics.DATASET_METRIC:
                raise EvalError(f"dataset '{d}' has no metric here; use some of {', '.join(LONGBENCH_DATASETS)}")
        self.limit = model.config.get_text_config(decoder=True).max_position_embeddings
        self.eos = eos_ids(model, tok)
        self._samples: dict[str, list[LongBenchSample]] = {}

    def groups(self) -> list[str]:
        return [metrics.dataset_name(d) for d in self.settings.datasets]

    def use_chat(self, dataset: str) -> bool:
        has = getattr(self.tok, "chat_template", None) is not None
        want = has if self.settings.chat_template is None else self.settings.chat_template
        if want and not has:
            raise EvalError("--chat-template was asked for but the tokenizer has none")
        return want and dataset not in NO_CHAT_TEMPLATE

    def _wrap(self, dataset: str) -> tuple[list[int], list[int]]:
        """Token ids that go before and after the prompt body (chat template, or the BOS token)."""
        tok = self.tok
        if self.use_chat(dataset):
            marker = "\x00PROMPT\x00"
            text = tok.apply_chat_template(
                [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
            )
            before, _, after = text.partition(marker)
            return (
                tok(before, add_special_tokens=False)["input_ids"],
                tok(after, add_special_tokens=False)["input_ids"],
            )
        bos = tok("", add_special_tokens=True)["input_ids"]  # the BOS token, for tokenizers that add one
        return bos, []

    def build(self, dataset: str, row: dict[str, Any]) -> LongBenchSample:
        template = self.prompts.get(dataset)
        if template is None:
            raise EvalError(f"no LongBench prompt for '{dataset}' in {self.folder / 'config'}")
        max_new = int(self.maxlen[dataset])
        if self.settings.max_new_tokens is not None:
            max_new = min(max_new, self.settings.max_new_tokens)
        prompt = template.format(**row)
        body = self.tok(prompt, add_special_tokens=False)["input_ids"]
        before, after = self._wrap(dataset)
        cap = self.limit - max_new
        if self.settings.max_prompt_tokens is not None:
            cap = min(cap, self.settings.max_prompt_tokens)
        room = cap - len(before) - len(after)
        kept = middle_truncate(body, room)
        ids = before + kept + after
        chat = bool(after)
        prefix = "" if chat or prompt.endswith((" ", "\n")) else " "
        return LongBenchSample(
            id=str(row.get("_id") or hashlib.sha256((row["input"] + row["context"]).encode()).hexdigest()[:16]),
            dataset=dataset,
            row=row,
            ids=ids,
            answer_prefix=prefix,
            max_new=max_new,
            truncated=len(kept) < len(body),
        )

    def _tokens(self, row: dict[str, Any]) -> int:
        """Prompt tokens before truncation: what a row costs (words are a poor guide for code or formulas)."""
        return len(self.tok(row.get("context", "") + row.get("input", ""), add_special_tokens=False)["input_ids"])

    def samples(self, group: str) -> list[LongBenchSample]:
        if group not in self._samples:
            path = self.folder / f"{group}_e.jsonl"
            if not path.is_file():
                raise EvalError(f"LongBench-E file '{path}' is missing; pass --data-dir with the shared data")
            rows = pick_rows(read_jsonl(path), self.settings.samples, self.settings.pick, self._tokens)
            self._samples[group] = [self.build(group, r) for r in rows]
        return self._samples[group]

    # Rows of different lengths are left-padded, and a padded prefill needs an explicit attention mask, which on
    # CPU takes SDPA off its fast causal path (a 4K-token row costs about twice as much). Batching pays for that
    # only when the answers are long enough: measured on SmolLM2, 2 cores, 16 schedules.
    MIN_BATCHED_ANSWER = 64

    def batches(self, samples: Sequence[LongBenchSample], size: int) -> list[list[LongBenchSample]]:
        """Rows of one dataset per batch, by length (datasets differ in answer length and metric); datasets with
        short answers (under MIN_BATCHED_ANSWER tokens) run one row at a time."""
        by_dataset: dict[str, list[LongBenchSample]] = {}
        for smp in samples:
            by_dataset.setdefault(smp.dataset, []).append(smp)
        out = []
        for group in by_dataset.values():
            n = size if group[0].max_new >= self.MIN_BATCHED_ANSWER else 1
            out += batches_by_length(group, lambda x: x.prompt_tokens, n)
        return out

    def prefix(self, batch: Sequence[LongBenchSample], query_window: int = 64) -> Prefix:
        return Prefix(self.model, [smp.ids for smp in batch], query_window, pad_id=_pad_id(self.tok, self.eos))

    def gold(self, sample: LongBenchSample) -> list[int]:
        answers = [a for a in sample.row.get("answers", []) if isinstance(a, str)]
        if not answers:
            return []
        return self.tok(sample.answer_prefix + answers[0], add_special_tokens=False)["input_ids"][: sample.max_new]

    def run_config(self, prefix: Prefix, batch: Sequence[LongBenchSample], schedule: Schedule | None):
        """Per-sample records of one schedule (None: the full cache) on a prefilled batch."""
        sched, cache, logp, kv = prefix.compressed(schedule)
        nll = answer_nll(self.model, prefix, sched, cache.fork(sched), logp, None, [self.gold(x) for x in batch])
        pad = _pad_id(self.tok, self.eos)
        new = generate_after(self.model, prefix, sched, cache, logp, None, [x.max_new for x in batch], self.eos, pad)
        out = []
        for i, smp in enumerate(batch):
            prediction = self.tok.decode(new[i], skip_special_tokens=True)
            answers = [a for a in smp.row.get("answers", []) if isinstance(a, str)]
            out.append(
                {
                    "id": smp.id,
                    "score": metrics.score(smp.dataset, prediction, answers),
                    "gold_nll": nll[i],
                    "kv_fraction": kv[i],
                    "prompt_tokens": smp.prompt_tokens,
                    "new_tokens": len(new[i]),
                    "truncated": smp.truncated,
                    "prediction": prediction,
                }
            )
        return out

    def run(self, samples: Sequence[LongBenchSample], schedules: dict[str, Schedule | None], batch_size: int = 1):
        """{name: per-sample records} for each named schedule; one full prefill per batch for all of them."""
        return _run_all(self, samples, schedules, batch_size)


def _pad_id(tok, eos: Sequence[int]) -> int:
    pad = getattr(tok, "pad_token_id", None)
    return int(pad) if pad is not None else (eos[0] if eos else 0)


def _run_all(task, samples, schedules: dict[str, Schedule | None], batch_size: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {k: [] for k in schedules}
    qw = max(64, max_window(list(schedules.values())))
    for batch in task.batches(samples, batch_size):
        prefix = task.prefix(batch, qw)
        for key, schedule in schedules.items():
            out[key] += task.run_config(prefix, batch, schedule)
    return out


# ---------------------------------------------------------------- needle retrieval


PLACES = [
    "Lisbon", "Oslo", "Cairo", "Lima", "Quito", "Dublin", "Hanoi", "Nairobi", "Tbilisi", "Riga", "Bergen",
    "Porto", "Zagreb", "Accra", "Tunis", "Kyoto", "Perth", "Halifax", "Salta", "Tromso",
]  # fmt: skip
INTRO = "Somewhere in the following text there is an access code. Remember it; you will be asked for it.\n\n"


@dataclass
class NeedleSample:
    id: str
    variant: str
    length: int
    depth: int
    question: str  # in-prompt | after-compression
    haystack: list[int]  # prompt (in-prompt: with the question) or the part compressed before the question
    extra: list[int]  # question tokens fed after compression (after-compression), else empty
    answers: list[str]
    max_new: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.haystack)


def needle_correct(prediction: str, answers: Sequence[str]) -> bool:
    """Exact match of the generated numbers: the first len(answers) numbers are exactly the answers (any order)."""
    found = re.findall(r"\d+", prediction)[: len(answers)]
    return sorted(found) == sorted(answers)


class NeedleTask:
    """Access codes hidden in Gutenberg prose at chosen depths; the answer is generated greedily.

    Variants: one code; several places with codes (ask one); one place with two codes (ask both). The question
    comes after the text, inside the compressed prompt (query-aware), or is fed after compression.
    Wording and names differ from calibrate.tasks (the calibration tasks).
    """

    name = "needle"

    def __init__(self, model, tok, settings: Settings):
        from . import data

        self.model, self.tok, self.settings = model, tok, settings
        limit = model.config.get_text_config(decoder=True).max_position_embeddings
        too_long = [n for n in settings.needle_lengths if n + 24 > limit]
        if too_long:
            raise EvalError(
                f"needle length {too_long[0]} exceeds the model's {limit} positions; lower --needle-lengths"
            )
        for v in settings.needle_variants:
            if v not in NEEDLE_VARIANTS:
                raise EvalError(f"unknown needle variant '{v}'; use some of {', '.join(NEEDLE_VARIANTS)}")
        for q in settings.needle_questions:
            if q not in QUESTION_SETTINGS:
                raise EvalError(f"unknown question setting '{q}'; use in-prompt or after-compression")
        for d in settings.needle_depths:
            if not 0 <= d <= 100:
                raise EvalError(f"needle depth {d} is outside 0..100 (percent)")
        self.text = "\n\n".join(data.load_texts([settings.folder("gutenberg")]))
        self.eos = eos_ids(model, tok)
        self._period = self._period_ids()

    def _period_ids(self) -> set[int]:
        vocab = self.tok.convert_ids_to_tokens(list(range(len(self.tok))))
        return {i for i, t in enumerate(vocab) if isinstance(t, str) and t.rstrip().endswith((".", "!", "?"))}

    def groups(self) -> list[str]:
        s = self.settings
        return [f"{q}|{n}|{d}" for q in s.needle_questions for n in s.needle_lengths for d in s.needle_depths]

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _filler(self, rng: random.Random, count: int) -> list[int]:
        chars = count * 8 + 2000
        start = rng.randrange(0, max(1, len(self.text) - chars))
        start = self.text.find(". ", start) + 2 if self.text.find(". ", start) >= 0 else start
        ids = self._ids(self.text[start : start + chars])
        while len(ids) < count:  # very short texts: repeat
            ids += ids
        return ids[:count]

    def _snap(self, filler: list[int], at: int) -> int:
        """Move an insertion point back to just after a sentence end, when one is near."""
        for i in range(at, max(0, at - 64), -1):
            if i > 0 and filler[i - 1] in self._period:
                return i
        return at

    def build(self, question_setting: str, length: int, depth: int, variant: str, rep: int) -> NeedleSample:
        rng = random.Random(f"{self.settings.seed}-{length}-{depth}-{variant}-{rep}")  # str seeds are stable
        places = rng.sample(PLACES, 4)
        target = places[0]

        def code() -> str:
            return str(rng.randint(10000, 99999))

        if variant == "multivalue":
            answers = [code(), code()]
            needles = [
                (depth, f" One access code for the {target} locker is {answers[0]}."),
                (min(100, depth + 15) if depth < 85 else depth, f" The other access code for the {target} locker "
                 f"is {answers[1]}."),
            ]  # fmt: skip
            question = f"\n\nQuestion: What are the two access codes for the {target} locker?\nAnswer: The two access codes for the {target} locker are"  # noqa: E501
            max_new = 16
        else:
            answers = [code()]
            needles = [(depth, f" The access code for the {target} locker is {answers[0]}.")]
            if variant == "multikey":
                spots = [d for d in (5, 20, 35, 50, 65, 80, 95) if abs(d - depth) >= 10]
                for place, d in zip(places[1:], rng.sample(spots, 3)):
                    needles.append((d, f" The access code for the {place} locker is {code()}."))
            question = f"\n\nQuestion: What is the access code for the {target} locker?\nAnswer: The access code for the {target} locker is"  # noqa: E501
            max_new = 8
        intro, q_ids = self._ids(INTRO), self._ids(question)
        needle_ids = sorted(((d, self._ids(t)) for d, t in needles), key=lambda x: x[0])
        bos = self.tok("", add_special_tokens=True)["input_ids"]
        room = length - len(bos) - len(intro) - len(q_ids) - sum(len(n) for _, n in needle_ids)
        if room < 16:
            raise EvalError(f"needle length {length} is too short for the question and codes; use longer lengths")
        filler = self._filler(rng, room)
        body: list[int] = []
        cursor = 0
        for d, n in needle_ids:
            cut = max(cursor, self._snap(filler, int(round(d / 100 * room))))
            body += filler[cursor:cut] + n
            cursor = cut
        body += filler[cursor:]
        haystack = bos + intro + body
        after = question_setting == "after-compression"
        return NeedleSample(
            id=f"{variant}-{rep}",
            variant=variant,
            length=length,
            depth=depth,
            question=question_setting,
            haystack=haystack if after else haystack + q_ids,
            extra=q_ids if after else [],
            answers=answers,
            max_new=max_new,
        )

    def samples(self, group: str) -> list[NeedleSample]:
        question, length, depth = group.split("|")
        s = self.settings
        return [
            self.build(question, int(length), int(depth), v, rep)
            for v in s.needle_variants
            for rep in range(s.needle_reps)
        ]

    def batches(self, samples: Sequence[NeedleSample], size: int) -> list[list[NeedleSample]]:
        """Prompts of the same length (and question length) per batch: no padding at all."""
        groups: dict[tuple[int, int], list[NeedleSample]] = {}
        for smp in samples:
            groups.setdefault((smp.prompt_tokens, len(smp.extra)), []).append(smp)
        return [g[i : i + size] for _, g in sorted(groups.items()) for i in range(0, len(g), size)]

    def prefix(self, batch: Sequence[NeedleSample], query_window: int = 64) -> Prefix:
        return Prefix(self.model, [smp.haystack for smp in batch], query_window, pad_id=_pad_id(self.tok, self.eos))

    def run_config(self, prefix: Prefix, batch: Sequence[NeedleSample], schedule: Schedule | None):
        sched, cache, logp, kv = prefix.compressed(schedule)
        extra = torch.tensor([smp.extra for smp in batch], dtype=torch.long) if batch[0].extra else None
        pad = _pad_id(self.tok, self.eos)
        new = generate_after(self.model, prefix, sched, cache, logp, extra, [x.max_new for x in batch], self.eos, pad)
        out = []
        for i, smp in enumerate(batch):
            prediction = self.tok.decode(new[i], skip_special_tokens=True)
            out.append(
                {
                    "id": smp.id,
                    "correct": float(needle_correct(prediction, smp.answers)),
                    "kv_fraction": kv[i],
                    "prompt_tokens": smp.prompt_tokens,
                    "prediction": prediction,
                    "answers": smp.answers,
                }
            )
        return out

    def run(self, samples: Sequence[NeedleSample], schedules: dict[str, Schedule | None], batch_size: int = 1):
        """{name: per-sample records} for each named schedule; one full prefill per batch for all of them."""
        return _run_all(self, samples, schedules, batch_size)


# ---------------------------------------------------------------- results store


STATS = {  # per task: per-sample field -> (stat name, scale)
    "lm": {"kl": 1.0, "nll": 1.0},
    "longbench": {"score": 100.0, "gold_nll": 1.0},
    "needle": {"correct": 100.0},
}


def aggregate(task: str, samples: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for name, scale in STATS[task].items():
        values = [s[name] * scale for s in samples if s.get(name) is not None and not _isnan(s[name])]
        stats[name] = metrics.bootstrap_ci(values, seed=seed).to_dict()
    if task == "lm":
        nll = stats["nll"]
        stats["ppl"] = {k: (math.exp(v) if k != "n" else v) for k, v in nll.items()}
    kv = [s["kv_fraction"] for s in samples if s.get("kv_fraction") is not None]
    return {"stats": stats, "kv_fraction": sum(kv) / len(kv) if kv else None}


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


class Store:
    """results.json: one record per (task, group, config) holding its per-sample results and their statistics.

    Written atomically after every change; samples already present are never recomputed.
    """

    def __init__(self, path: Path, meta: dict[str, Any]):
        from runtime.schedule import write_atomic

        self._write = write_atomic
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        self.meta = dict(meta)
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                raise EvalError(f"'{self.path}' is not valid JSON; remove it or use another --out-dir") from None
            self._check(old.get("meta", {}))
            merged = dict(old.get("meta", {}).get("task_settings", {}))
            merged.update(self.meta.get("task_settings", {}))
            self.meta["task_settings"] = merged
            for r in old.get("records", []):
                self.records[r["key"]] = r

    def _check(self, old: dict[str, Any]) -> None:
        new = self.meta
        if old.get("model") and old.get("model") != new.get("model"):
            raise EvalError(
                f"'{self.path}' holds results for model {old['model']}, not {new['model']}; use another --out-dir"
            )
        if old.get("dtype") and old.get("dtype") != new.get("dtype"):
            raise EvalError(f"'{self.path}' holds {old['dtype']} results, not {new['dtype']}; use another --out-dir")
        for task, settings in new.get("task_settings", {}).items():
            before = old.get("task_settings", {}).get(task)
            if before is not None and before != settings:
                diff = next(k for k in settings if before.get(k) != settings.get(k))
                raise EvalError(
                    f"'{self.path}' holds {task} results made with {diff}={before.get(diff)!r}, not "
                    f"{settings.get(diff)!r}; use the same options or another --out-dir"
                )

    @staticmethod
    def key(task: str, group: str, config: Config) -> str:
        return f"{task}|{group}|{config.key}"

    def forget_stale(self, configs: Sequence[Config]) -> None:
        """Drop the stored records of these columns that were made from another schedule (same label, changed
        file or borrowed settings): they are computed again."""
        for key, r in list(self.records.items()):
            config = next((c for c in configs if key.endswith("|" + c.key)), None)  # task|group|column
            if config is not None and r.get("schedule_digest", "") != config.digest:
                del self.records[key]

    def has(self, task: str, group: str, config: Config, sample_id: str) -> bool:
        r = self.records.get(self.key(task, group, config))
        return r is not None and any(s["id"] == sample_id for s in r["samples"])

    def add(self, task: str, group: str, config: Config, fields: dict[str, Any], samples: list[dict[str, Any]],
            expected: Sequence[str]) -> dict[str, Any]:  # fmt: skip
        key = self.key(task, group, config)
        r = self.records.get(key)
        if r is None:
            r = {"key": key, "task": task, "group": group, "method": config.method, "budget": config.budget,
                 "mode": config.mode, "schedule_file": config.path, "schedule_digest": config.digest, **fields,
                 "samples": []}  # fmt: skip
            self.records[key] = r
        have = {s["id"] for s in r["samples"]}
        r["samples"] += [s for s in samples if s["id"] not in have]
        r.update(aggregate(task, r["samples"]))
        r["complete"] = set(expected) <= {s["id"] for s in r["samples"]}
        return r

    def save(self) -> Path:
        body = {"meta": self.meta, "records": list(self.records.values())}
        return self._write(self.path, json.dumps(body, indent=1, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


# ---------------------------------------------------------------- running everything


def group_fields(task: str, group: str) -> dict[str, Any]:
    if task == "lm":
        return {"dataset": group}
    if task == "longbench":
        return {"dataset": group, "metric": metrics.DATASET_METRIC[group]}
    question, length, depth = group.split("|")
    return {"dataset": "gutenberg", "question": question, "length": int(length), "depth": int(depth)}


def run_task(
    task,
    configs: Sequence[Config],
    maker: ScheduleMaker,
    store: Store,
    batch_size: int = 8,
    progress: Callable[[str, int], Any] | None = None,
) -> int:
    """Compute every missing (sample, config) of a task, saving after each; returns how many were computed.

    LongBench and needle prompts run in batches (prefilled once, then every config forks the batch's cache); a
    batch runs the configs that any of its samples still lacks, and only the missing results are stored.
    """
    computed = 0
    name = task.name
    if name == "lm":
        group = "wikitext2"
        ids = [s.id for s in task.samples()]
        qw = max(64, max_window([maker.schedule(c, task.prompt_tokens) for c in configs]))
        for config in configs:
            if all(store.has(name, group, config, i) for i in ids):
                continue
            t0 = time.perf_counter()
            records = task.run_all(maker.schedule(config, task.prompt_tokens), query_window=qw)
            for rec in records:  # the first config also pays the prefill of every window
                rec["seconds"] = round((time.perf_counter() - t0) / max(len(records), 1), 3)
            store.add(name, group, config, group_fields(name, group), records, ids)
            store.save()
            computed += len(records)
            if progress:
                progress(config.key, len(records))
        return computed
    group_of: dict[int, str] = {}
    expected: dict[str, list[str]] = {}
    pending = []
    for group in task.groups():
        samples = task.samples(group)
        expected[group] = [s.id for s in samples]
        for smp in samples:
            group_of[id(smp)] = group
            if any(not store.has(name, group, c, smp.id) for c in configs):
                pending.append(smp)
    for batch in task.batches(pending, batch_size):
        groups = [group_of[id(smp)] for smp in batch]
        todo = [c for c in configs if any(not store.has(name, g, c, smp.id) for g, smp in zip(groups, batch))]
        n = round(sum(x.prompt_tokens for x in batch) / len(batch))  # references are built at the mean length
        prefix = task.prefix(batch, max(64, max_window([maker.schedule(c, n) for c in todo])))
        t0 = time.perf_counter()
        if any(c.mode == "evict" or c.is_full for c in todo):  # drop mode prefills under each schedule instead
            prefix.full()
        prefill = (time.perf_counter() - t0) / len(batch)
        for config in todo:
            t0 = time.perf_counter()
            records = task.run_config(prefix, batch, maker.schedule(config, prefix.tokens))
            seconds = (time.perf_counter() - t0) / len(batch)
            added = 0
            for g, smp, rec in zip(groups, batch, records):
                rec.update(seconds=round(seconds, 3), prefill_seconds=round(prefill, 3), batch=len(batch))
                if not store.has(name, g, config, smp.id):
                    store.add(name, g, config, {**group_fields(name, g), "sample_ids": expected[g]}, [rec], expected[g])
                    added += 1
            store.save()
            computed += added
            if progress:
                progress(groups[0], added)
    return computed


def units(task, configs: Sequence[Config], store: Store) -> tuple[int, int]:
    """(missing, total) (sample, config) pairs of a task, for progress bars."""
    total = missing = 0
    for group in task.groups():
        for s in task.samples(group):
            for c in configs:
                total += 1
                missing += not store.has(task.name, group, c, s.id)
    return missing, total


def iter_records(store: Store, task: str | None = None) -> Iterator[dict[str, Any]]:
    for r in store.records.values():
        if task is None or r["task"] == task:
            yield r
