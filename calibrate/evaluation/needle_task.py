"""Needle retrieval: access codes hidden in Gutenberg prose, answered greedily (a `PromptTask`)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from runtime.schedule import Schedule

from .. import data
from .batching import GreedyPromptTask, Prefix
from .config import NEEDLE_VARIANTS, QUESTION_SETTINGS, EvalError, Settings

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


class NeedleTask(GreedyPromptTask):
    """Access codes hidden in Gutenberg prose at chosen depths; the answer is generated greedily.

    Variants: one code; several places with codes (ask one); one place with two codes (ask both). The question
    comes after the text, inside the compressed prompt (query-aware), or is fed after compression.
    Wording and names differ from calibrate.tasks (the calibration tasks).
    """

    name = "needle"

    def __init__(self, model, tok, settings: Settings):
        super().__init__(model, tok)
        self.settings = settings
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
        return self.make_prefix([smp.haystack for smp in batch], query_window)

    def run_config(self, prefix: Prefix, batch: Sequence[NeedleSample], schedule: Schedule | None):
        """Per-sample records of one schedule (None: the full cache) on a prefilled batch."""
        sched, cache, logp, kv = prefix.compressed(schedule)
        extra = torch.tensor([smp.extra for smp in batch], dtype=torch.long) if batch[0].extra else None
        _, predictions = self.greedy(prefix, sched, cache, logp, extra, [x.max_new for x in batch])
        return [
            {
                "id": smp.id,
                "correct": float(needle_correct(predictions[i], smp.answers)),
                "kv_fraction": kv[i],
                "prompt_tokens": smp.prompt_tokens,
                "prediction": predictions[i],
                "answers": smp.answers,
            }
            for i, smp in enumerate(batch)
        ]
