"""Score schedules end to end, cheaply: prefill once, then fork the cache for every candidate.

Each example is a context (prefilled and compressed) and a continuation fed teacher-forced after compression.
The full-cache prefill and the full-cache continuation distributions are computed once; a candidate schedule
(evict mode) only costs trimming the forked cache and one forward pass over the continuations. `rows` gives every
example's own scores (and can prefill under the schedule instead: drop mode); `score` sums them up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

import runtime
from runtime.cache import PyramidCache
from runtime.families import decoder_layers, layer_plan
from runtime.inspect import kept_per_row
from runtime.schedule import Schedule


@dataclass
class Example:
    """`context` is compressed; `continuation` is scored where `scored` is True (predictions of those tokens)."""

    context: torch.Tensor  # [C]
    continuation: torch.Tensor  # [M]
    scored: torch.Tensor  # [M] bool: which continuation tokens count (the first one is predicted by the prefill)
    kind: str = "text"  # "text" (KL, perplexity) or "retrieval" (also exact match of the scored tokens)


@dataclass
class Scores:
    kl: float  # mean KL(full || compressed) per scored token, nats
    nll: float  # mean negative log-likelihood of the scored tokens under the compressed cache
    accuracy: float | None  # retrieval examples: share whose scored tokens are all argmax-correct
    per_example_kl: list[float]
    per_example_correct: list[bool | None]

    @property
    def ppl(self) -> float:
        return float(torch.tensor(self.nll).exp())


@dataclass
class Reference:
    """The full cache's next-token distributions at a batch's scored positions [b, P, V], kept as logits,
    probabilities and log-normalisers, the form in which a candidate's KL is cheap and precise (`token_scores`)."""

    logits: torch.Tensor  # [b, P, V]
    probs: torch.Tensor  # [b, P, V]
    lse: torch.Tensor  # [b, P] logsumexp of the logits
    mass: torch.Tensor  # [b, P] sum of probs (1 up to rounding; divided out so that the KL's terms cancel exactly)
    # two [b, P, V] buffers that every scoring of this batch reuses: fresh ones would cost their page faults (a
    # fresh 75 MB temporary per product took longer than the product itself)
    work: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, logits: torch.Tensor) -> Reference:
        lse = torch.logsumexp(logits, -1)
        probs = torch.exp(logits - lse[..., None])
        return cls(logits, probs, lse, probs.sum(-1))

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.work is None:
            self.work = (torch.empty_like(self.logits), torch.empty_like(self.logits))
        return self.work


def token_scores(
    logits: torch.Tensor, ref: Reference, targets: torch.Tensor, argmax: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """KL(full || compressed) and NLL of `targets` [b, P] at every position of `logits` [b, P, V]; the argmax too
    when asked (exact match of retrieval answers).

    With p the full cache's distribution and d = logits - ref.logits (the change of every logit, small where the
    compression matters little), lse(logits) = ref.lse + log sum p e^d, so for any shift m
    KL = sum p (log p - log q) = log1p(sum p expm1(d - m)) - sum p (d - m).
    With m the p-weighted mean of d every term is as small as the change itself: KLs of 1e-9 nats keep their
    digits, where differencing two float32 log-softmaxes (magnitude ~10) is off by ~1e-7; the second sum takes
    out, to first order, the rounding of m. Sums are pairwise ((p * x).sum): a batched mat-vec accumulates in
    sequence and loses ~1e-5 relative over a 50k vocabulary. Not reentrant: it works in `ref`'s buffers.
    """
    d, prod = ref.buffers()
    torch.sub(logits, ref.logits, out=d)
    m = torch.mul(ref.probs, d, out=prod).sum(-1) / ref.mass
    d.sub_(m[..., None])
    centred = torch.mul(ref.probs, d, out=prod).sum(-1) / ref.mass
    log_ratio = torch.log1p(torch.mul(ref.probs, d.expm1_(), out=prod).sum(-1) / ref.mass)  # log sum p e^(d - m)
    kl = log_ratio - centred
    nll = ref.lse + m + log_ratio - logits.gather(-1, targets[..., None])[..., 0]
    return kl, nll, logits.argmax(-1) if argmax else None


def scored_positions(examples: Sequence[Example]) -> torch.Tensor:
    """The continuation positions whose logits some example scores (position t predicts token t+1). Only these
    need the LM head, and no token after the last of them needs a forward at all (attention is causal)."""
    return torch.stack([e.scored[1:] for e in examples]).any(0).nonzero()[:, 0]


@dataclass
class Row:
    """One example's scores under a schedule."""

    index: int  # which example
    kl: torch.Tensor  # [S] KL(full || compressed) per scored token, nats
    nll: torch.Tensor  # [S] negative log-likelihood per scored token
    correct: bool | None  # retrieval examples: every scored token argmax-right; None for text
    kv_fraction: float | None  # measure_kv: the share of KV its compressed cache kept (see `row_kv_fractions`)


def row_kv_fractions(cache, plan: list[tuple[bool, int | None]], prompt_tokens: Sequence[int]) -> list[float]:
    """Per row: real tokens kept (valid slots, averaged over KV heads) in the compressible layers over the full
    cache of that row's prompt. Padding slots do not count."""
    layers = [i for i, (compressible, _) in enumerate(plan) if compressible]
    if not layers:
        return [1.0] * len(prompt_tokens)
    kept = sum(kept_per_row(cache, i) for i in layers) / len(layers)  # [B]
    return [round(float(k) / n, 6) for k, n in zip(kept.tolist(), prompt_tokens)]


@contextlib.contextmanager
def _layers_from(model, first: int, hidden: torch.Tensor) -> Iterator[None]:
    """Run only decoder layers `first`.. of `model`, starting from `hidden` [B, M, D], the input that layer
    `first` had in the full-cache continuation. Exact when only layers >= `first` differ from the full cache:
    the layers below would compute the same hidden states, and the ones above read nothing of theirs."""
    layers = decoder_layers(model)
    if first == 0:
        yield
        return
    own = [vars(layer).get("forward") for layer in layers[:first]]  # accelerate's offload hooks live there

    def skip(hidden_states, *args, **kwargs):
        return hidden_states

    def start(module, args, kwargs):
        return (hidden, *args[1:]), kwargs

    for layer in layers[:first]:
        layer.forward = skip
    handle = layers[first].register_forward_pre_hook(start, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for layer, forward in zip(layers[:first], own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def one_part_compressed(base: Schedule, layer: int, head: int, ratio: float, heads: int | None) -> Schedule:
    """`base` (which keeps every token) with only layer `layer` keeping `ratio` of its context, or with `heads`
    only KV head `head` of it."""
    if not heads:
        ratios = list(base.ratios)
        ratios[layer] = ratio
        return base.with_ratios(ratios)
    shares = [[1.0] * heads for _ in base.ratios]
    shares[layer][head] = ratio
    return base.with_head_ratios(shares)


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


class Evaluator:
    """Holds the prefilled full caches and reference distributions of a fixed set of examples.

    Candidates are scored one at a time, so their forks append into room the full caches reserve for the
    continuation (`PyramidCache.fork(into_room=True)`); `into_room = False` copies instead (the simple path the
    tests compare with)."""

    into_room = True

    def __init__(
        self,
        model,
        examples: Sequence[Example],
        query_window: int = 64,
        sinks: int = 4,
        batch_size: int = 4,
        progress: Callable[[str, int, int], None] | None = None,
    ):
        if not examples:
            raise ValueError("no examples to evaluate on")
        lengths = {(e.context.numel(), e.continuation.numel()) for e in examples}
        if len(lengths) != 1:
            raise ValueError(f"examples must share context and continuation lengths, got {sorted(lengths)}")
        self.model = model
        self.examples = list(examples)
        self.layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.query_window = query_window
        # the probe keeps everything and remembers `query_window` recent queries per layer
        self.probe = Schedule(ratios=[1.0] * self.layers, window=query_window, sinks=sinks)
        self.plan = layer_plan(model)
        self.batches = _batches(len(self.examples), batch_size)
        self.caches: list[PyramidCache] = []
        # per batch: the continuation positions scored by any of its rows, and the full cache's distributions there
        self.positions = [scored_positions([self.examples[j] for j in idx]) for idx in self.batches]
        self.reference: list[Reference] = []
        # per batch, at those positions: each row's next tokens [b, P] and whether the row scores there [b, P]
        self.targets = [self._at_positions(idx, b, "continuation") for b, idx in enumerate(self.batches)]
        self.scored = [self._at_positions(idx, b, "scored") for b, idx in enumerate(self.batches)]
        self.retrieval = [any(self.examples[j].kind == "retrieval" for j in idx) for idx in self.batches]
        # per batch, per layer: its input hidden states [b, n, D] in the full-cache continuation (`from_layer`),
        # n the continuation tokens that reach the last scored position
        self.layer_inputs: list[list[torch.Tensor]] = []
        device = model.device
        with torch.inference_mode(), runtime.apply(model, self.probe):
            for i, idx in enumerate(self.batches):
                ctx = torch.stack([self.examples[j].context for j in idx]).to(device)
                out = model(ctx, logits_to_keep=1)
                cache = runtime.cache_of(out)
                # room for the continuation: every candidate's fork appends there instead of copying the
                # prompt's slots of each layer it does not trim (one copy now instead of one per candidate)
                positions = self.positions[i]
                cache.reserve(int(positions[-1]) + 1 if positions.numel() else 1)
                self.caches.append(cache)
                inputs: list[torch.Tensor] = []
                handles = [
                    layer.register_forward_pre_hook(lambda m, args, inputs=inputs: inputs.append(args[0]))
                    for layer in decoder_layers(model)
                ]
                try:
                    self.reference.append(Reference.of(self.continuation_logits(idx, self.probe)))
                finally:
                    for h in handles:
                        h.remove()
                self.layer_inputs.append(inputs)
                if progress:
                    progress("prefill", i + 1, len(self.batches))

    @property
    def context_length(self) -> int:
        return self.examples[0].context.numel()

    def _at_positions(self, idx: range, b: int, name: str) -> torch.Tensor:
        """[b, P]: each row's `name` ("continuation", "scored") for the token that position t predicts (t+1), at
        the positions that batch `b` scores."""
        return torch.stack([getattr(self.examples[j], name)[1:][self.positions[b]] for j in idx]).to(self.model.device)

    def continuation_logits(
        self, idx: range, schedule: Schedule, cache: PyramidCache | None = None, from_layer: int = 0
    ) -> torch.Tensor:
        """[b, P, V] float logits at the batch's scored positions, the continuation fed only up to the last."""
        b = self.batches.index(idx)
        if cache is None:
            cache = self.caches[b].fork(schedule, into_room=self.into_room)
        positions = self.positions[b]
        n = int(positions[-1]) + 1 if positions.numel() else 1
        cont = torch.stack([self.examples[j].continuation[:n] for j in idx]).to(self.model.device)
        hidden = self.layer_inputs[b][from_layer] if from_layer else None
        keep = 0 if positions.numel() == n else positions.to(self.model.device)  # 0: every position
        with _layers_from(self.model, from_layer, hidden):
            logits = self.model(cont, cache=cache, logits_to_keep=keep).logits
        return logits.float()

    def compressed_cache(self, batch: int, schedule: Schedule) -> PyramidCache:
        cache = self.caches[batch].fork(schedule, into_room=self.into_room)
        cache.compress_now()
        return cache

    @torch.inference_mode()
    def rows(
        self,
        schedule: Schedule,
        prefill_mode: str = "evict",
        measure_kv: bool = False,
        on_batch: Callable[[int, list[Row]], None] | None = None,
        from_layer: int = 0,
    ) -> list[Row]:
        """Every example's scores under `schedule`, in order.

        `prefill_mode` "evict" forks each batch's full cache and compresses it (the tokens a prefill under the
        schedule keeps); "drop" prefills the contexts under the schedule itself. Either way the continuation then
        runs under the schedule. `measure_kv`: also measure each row's kept KV share, right after compression.
        `on_batch(batches_done, batch_rows)` is called after each batch. `from_layer`: `schedule` keeps every token
        in the layers below it (evict mode), so the continuation runs only from that layer on, from the hidden
        states the full-cache continuation had there (the same result, fewer layers computed and copied).
        """
        if from_layer and (prefill_mode != "evict" or any(r < 1.0 for r in schedule.ratios[:from_layer])):
            raise ValueError(f"from_layer {from_layer} needs an evict-mode schedule that keeps every layer below it")
        if prefill_mode not in ("evict", "drop"):
            raise ValueError(f"prefill_mode must be 'evict' or 'drop', got {prefill_mode!r}")
        if prefill_mode == "evict" and schedule.window > self.query_window:
            raise ValueError(f"schedule window {schedule.window} exceeds the probe's {self.query_window}")
        out: list[Row] = []
        with runtime.apply(self.model, schedule):
            for b, idx in enumerate(self.batches):
                if prefill_mode == "drop":
                    ctx = torch.stack([self.examples[j].context for j in idx]).to(self.model.device)
                    cache = self.model(ctx, logits_to_keep=1).cache
                else:
                    cache = self.compressed_cache(b, schedule)
                # measured before the continuation adds to the cache
                kv = row_kv_fractions(cache, self.plan, [self.context_length] * len(idx)) if measure_kv else None
                logits = self.continuation_logits(idx, schedule, cache, from_layer)
                kl, nll, top = token_scores(logits, self.reference[b], self.targets[b], self.retrieval[b])
                batch = []
                for row, j in enumerate(idx):
                    sel = self.scored[b][row]
                    correct = None
                    if self.examples[j].kind == "retrieval":
                        correct = bool((top[row][sel] == self.targets[b][row][sel]).all())
                    batch.append(Row(j, kl[row][sel], nll[row][sel], correct, None if kv is None else kv[row]))
                out += batch
                if on_batch is not None:
                    on_batch(b + 1, batch)
        return out

    @torch.inference_mode()
    def score(
        self, schedule: Schedule, on_batch: Callable[[int, float], None] | None = None, from_layer: int = 0
    ) -> Scores:
        """Evict-mode scores of `schedule` on every example.

        `on_batch(batches_done, mean_kl_so_far)` is called after each batch (a search prunes from it);
        `from_layer`: see `rows`.
        """
        totals = (0.0, 0.0, 0)  # KL, NLL, scored tokens so far

        def tally(done: int, batch: list[Row]) -> None:
            nonlocal totals
            totals = _totals(batch, totals)
            if on_batch is not None:
                on_batch(done, totals[0] / max(totals[2], 1))

        rows = self.rows(schedule, on_batch=tally, from_layer=from_layer)
        kl_sum, nll_sum, count = totals
        oks = [r.correct for r in rows if r.correct is not None]
        return Scores(
            kl=kl_sum / max(count, 1),
            nll=nll_sum / max(count, 1),
            accuracy=(sum(oks) / len(oks)) if oks else None,
            per_example_kl=[float(r.kl.mean()) for r in rows],
            per_example_correct=[r.correct for r in rows],
        )

    def full_accuracy(self) -> float | None:
        return self.score(self.probe).accuracy


def _totals(rows: Sequence[Row], start: tuple[float, float, int]) -> tuple[float, float, int]:
    """`start` plus the rows' (KL sum, NLL sum, scored tokens), added row by row."""
    kl_sum, nll_sum, count = start
    for r in rows:
        kl_sum += float(r.kl.sum())
        nll_sum += float(r.nll.sum())
        count += r.kl.numel()
    return kl_sum, nll_sum, count
