"""Prefill once, fork per schedule: left-padded prompt batches (`Prefix`), greedy answers and teacher-forced
answer NLL after the compressed prompt, and how prompts are grouped into batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

import runtime
from runtime.families import layer_plan
from runtime.schedule import Schedule

from ..scoring import row_kv_fractions
from .config import EvalError

T = TypeVar("T")


def eos_ids(model, tok) -> list[int]:
    ids: list[int] = []
    for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if src is None:
            continue
        ids += [int(i) for i in (src if isinstance(src, (list, tuple)) else [src])]
    return sorted(set(ids))


def pad_token(tok, eos: Sequence[int]) -> int:
    """The tokenizer's pad token, else the first EOS token, else 0."""
    pad = getattr(tok, "pad_token_id", None)
    return int(pad) if pad is not None else (eos[0] if eos else 0)


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
        # explicit positions, counted over each row's real tokens, here and in every later call: under
        # runtime.apply `generate` computes none (the patched forward hides its signature), and the runtime's own
        # default counts pads, so a row would be shifted by its padding in one call and not in the next
        return {"attention_mask": self.mask, "position_ids": runtime.mask_positions(self.mask)} if self.padded else {}

    def _prefill(self, schedule: Schedule):
        with torch.inference_mode(), runtime.apply(self.model, schedule):
            out = self.model(self.ids, logits_to_keep=1, **self._inputs())
        return out.cache, torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def full(self):
        """The full cache and next-token log-probs, prefilled on the first call."""
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


def cut_at_eos(tokens: list[int], eos: Sequence[int], limit: int) -> list[int]:
    """The first `limit` tokens, cut after the first EOS among them."""
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
            return [cut_at_eos(f, eos, n) for f, n in zip(first, limits)]
        feed, steps = top[:, None].to(device), steps - 1
    else:
        feed = extra.to(device)
    full = torch.cat([prefix.ids, feed], dim=1)
    mask = torch.cat([prefix.mask, torch.ones_like(feed)], dim=1)
    with torch.inference_mode(), runtime.apply(model, schedule):
        out = model.generate(
            full,
            attention_mask=mask,  # without it, generate under runtime.apply re-feeds the whole prompt
            position_ids=runtime.mask_positions(mask),
            cache=cache,
            max_new_tokens=steps,
            do_sample=False,
            num_beams=1,
            eos_token_id=list(eos) or None,
            pad_token_id=pad_id,
        )
    new = out[:, full.shape[1] :].tolist()
    return [cut_at_eos(f + row, eos, n) for f, row, n in zip(first, new, limits)]


class GreedyPromptTask:
    """What the prompt tasks share: the model and tokenizer with their EOS and pad tokens, batches as a `Prefix`,
    and greedy answers after a compressed one."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.eos = eos_ids(model, tok)
        self.pad = pad_token(tok, self.eos)

    def make_prefix(self, prompts: Sequence[Sequence[int]], query_window: int) -> Prefix:
        return Prefix(self.model, prompts, query_window, pad_id=self.pad)

    def greedy(
        self, prefix: Prefix, schedule: Schedule, cache, logp: torch.Tensor, extra: torch.Tensor | None,
        max_new: Sequence[int],
    ) -> tuple[list[list[int]], list[str]]:  # fmt: skip
        """Per row: the greedy answer's tokens and text (see `generate_after`)."""
        new = generate_after(self.model, prefix, schedule, cache, logp, extra, max_new, self.eos, self.pad)
        return new, [self.tok.decode(t, skip_special_tokens=True) for t in new]


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


def batches_by_length(items: Sequence[T], length: Callable[[T], int], size: int, waste: float = 1.0) -> list[list[T]]:
    """Items sorted by length, cut into batches of at most `size` whose left padding adds at most `waste` times
    the real tokens (a long outlier gets a batch of its own), then evened out.

    Padding costs prefill once per batch, while every batch costs decoding once per schedule: on CPU fewer,
    fuller batches are cheaper even with a fair amount of padding.
    """
    out: list[list[T]] = []
    for item in sorted(items, key=length):
        if out and len(out[-1]) < size:
            batch = out[-1]
            real = sum(length(x) for x in batch) + length(item)
            if (len(batch) + 1) * length(item) <= (1 + waste) * real:
                batch.append(item)
                continue
        out.append([item])
    # even out consecutive batches that were cut by size only (9 items, size 8: 4 + 5, not 8 + 1)
    merged: list[list[T]] = []
    for batch in out:
        if merged and len(merged[-1]) == size and len(batch) < size:
            both = merged.pop() + batch
            half = len(both) // 2
            merged += [both[:half], both[half:]]
        else:
            merged.append(batch)
    return merged
