"""What an evaluation runs: the tasks, methods and prefill modes, the task sizes (`Settings`), and one column of
the comparison (`Config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CalibrateError
from ..paths import shared_data

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
