"""Language modelling on WikiText-2 test windows, scored through `Evaluator` (a `WindowTask`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from runtime.schedule import Schedule

from .. import data
from ..scoring import Evaluator
from ..tasks import text_examples
from .config import EvalError, Settings


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
        self.model, self.tok, self.settings = model, tok, settings
        self.evaluator: Evaluator | None = None
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

    def _evaluator(self, query_window: int) -> Evaluator:
        if self.evaluator is None or self.evaluator.query_window < query_window:
            examples = text_examples(self.windows, self.settings.lm_context)
            self.evaluator = Evaluator(self.model, examples, query_window=max(64, query_window),
                                       batch_size=self.settings.lm_batch)  # fmt: skip
        return self.evaluator

    def run_all(self, schedule: Schedule | None, query_window: int = 64) -> list[dict[str, Any]]:
        """Per-window records for one schedule (None: the full cache), in its own prefill mode."""
        ev = self._evaluator(max(query_window, schedule.window if schedule else 0))
        if schedule is None:
            schedule = ev.probe
        return [
            {"id": f"w{r.index}", "kl": float(r.kl.mean()), "nll": float(r.nll.mean()), "kv_fraction": r.kv_fraction}
            for r in ev.rows(schedule, prefill_mode=schedule.prefill_mode, measure_kv=True)
        ]
