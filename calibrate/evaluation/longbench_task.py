"""LongBench-E with the official prompts, answer lengths and metrics (a `PromptTask`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.schedule import Schedule

from .. import metrics
from .batching import GreedyPromptTask, Prefix, answer_nll, batches_by_length
from .config import LONGBENCH_DATASETS, NO_CHAT_TEMPLATE, EvalError, Settings


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

    @property
    def answers(self) -> list[str]:
        """The row's gold answers."""
        return [a for a in self.row.get("answers", []) if isinstance(a, str)]


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


class LongBenchTask(GreedyPromptTask):
    """LongBench-E rows with the official prompts and answer lengths, greedy answers scored with LongBench's
    metrics, plus the NLL of the first gold answer teacher-forced after the compressed prompt."""

    name = "longbench"

    # Rows of different lengths are left-padded, and a padded prefill needs an explicit attention mask, which on
    # CPU takes SDPA off its fast causal path (a 4K-token row costs about twice as much). Batching pays for that
    # only when the answers are long enough: measured on SmolLM2, 2 cores, 16 schedules.
    MIN_BATCHED_ANSWER = 64

    def __init__(self, model, tok, settings: Settings):
        super().__init__(model, tok)
        self.settings = settings
        self.folder = settings.folder("longbench_e")
        self.prompts, self.maxlen = load_longbench_config(self.folder)
        for d in settings.datasets:
            if metrics.dataset_name(d) not in metrics.DATASET_METRIC:
                raise EvalError(f"dataset '{d}' has no metric here; use some of {', '.join(LONGBENCH_DATASETS)}")
        self.limit = model.config.get_text_config(decoder=True).max_position_embeddings
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
        return self.make_prefix([smp.ids for smp in batch], query_window)

    def gold(self, sample: LongBenchSample) -> list[int]:
        """The first gold answer's tokens, as they would follow the prompt (at most `max_new`)."""
        answers = sample.answers
        if not answers:
            return []
        return self.tok(sample.answer_prefix + answers[0], add_special_tokens=False)["input_ids"][: sample.max_new]

    def run_config(self, prefix: Prefix, batch: Sequence[LongBenchSample], schedule: Schedule | None):
        """Per-sample records of one schedule (None: the full cache) on a prefilled batch."""
        sched, cache, logp, kv = prefix.compressed(schedule)
        nll = answer_nll(self.model, prefix, sched, cache.fork(sched), logp, None, [self.gold(x) for x in batch])
        new, predictions = self.greedy(prefix, sched, cache, logp, None, [x.max_new for x in batch])
        return [
            {
                "id": smp.id,
                "score": metrics.score(smp.dataset, predictions[i], smp.answers),
                "gold_nll": nll[i],
                "kv_fraction": kv[i],
                "prompt_tokens": smp.prompt_tokens,
                "new_tokens": len(new[i]),
                "truncated": smp.truncated,
                "prediction": predictions[i],
            }
            for i, smp in enumerate(batch)
        ]
