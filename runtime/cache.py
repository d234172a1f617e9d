"""A transformers `Cache` whose layers each keep their own share of the tokens.

A layer is a `PyramidLayer` (runtime.layer), or a `RaggedLayer` (runtime.ragged_layer) where its KV heads keep
different shares; the cache decides when each trims and, in drop mode, what the next layer gets.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache

from . import selection
from .layer import PyramidLayer, Step
from .ragged_layer import QueryRing, RaggedLayer
from .schedule import Schedule, describe, kept_tokens

__all__ = ["AnyLayer", "PyramidCache", "PyramidLayer", "RaggedLayer", "Step", "cache_bytes", "kv_bytes"]

AnyLayer = PyramidLayer | RaggedLayer


class LateFlag:
    """A device-side boolean that the host reads later without stalling the device: on CUDA it is copied at once,
    without blocking, into pinned host memory, and reading it waits only for that copy (long done by the next
    step: the device runs the step's work queued after it meanwhile). On the CPU it is simply read."""

    def __init__(self, flag: torch.Tensor, host: torch.Tensor | None = None):
        self.event = None
        if flag.is_cuda:
            self.host = host if host is not None else torch.empty((), dtype=torch.bool, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(flag.device))  # the flag's device, not the current one
        else:
            self.host = flag

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


def _forked(layer: PyramidLayer, ratio: float, schedule: Schedule, into_room: bool = False) -> PyramidLayer:
    """A copy of `layer` that shares its tensors and keeps `ratio` under `schedule`."""
    out = copy.copy(layer)
    out.ratio = ratio
    out.compressible = ratio < 1.0 and not out.is_sliding and out.plan_compressible
    out.query_window = schedule.window
    out.spare = schedule.decode.interval
    if not into_room:
        # the views become the buffers: no spare room, so the fork's first append copies instead of writing into
        # storage that the source cache (or another fork) still uses
        out.keys, out.values, out.pos, out.valid = out.keys, out.values, out.pos, out.valid
    out.keep_newest_queries()
    return out


class PyramidCache(Cache):
    """The KV cache used under `runtime.apply`: one `PyramidLayer` per decoder layer."""

    # a decode step learns whether its token is padding at the next pass instead of waiting for the device now;
    # False waits now (the simple path the tests compare with)
    defer_validity = True

    def __init__(self, schedule: Schedule, plan: list[tuple[bool, int | None]]):
        """`plan` holds, per layer, whether it may be compressed and its sliding window (or None)."""
        layers: list[AnyLayer] = []
        for i, (r, (c, w)) in enumerate(zip(schedule.ratios, plan, strict=True)):
            heads = schedule.layer_head_ratios(i)
            if c and heads is not None:
                layers.append(RaggedLayer.new(heads, w, schedule.window, schedule.decode.interval))
            else:
                layers.append(PyramidLayer(r, c, w, schedule.window, schedule.decode.interval))
        super().__init__(layers=layers)
        self.schedule = schedule
        self.seen_slots = 0  # positions fed so far, pads included: what generate slices its input by
        self.seen_valid: torch.Tensor | None = None  # [B] real tokens fed so far per row
        self.step: Step | None = None
        self.since_trim = [0] * len(self.layers)  # per layer: tokens fed since its last trim
        self.ragged_kernel = False  # decode split layers in one kernel launch (`runtime.apply(..., ragged_kernel=)`)
        self.late_invalid: LateFlag | None = None  # whether the last decode step fed padding, not yet read
        # drop mode: after layer l only the tokens some deeper layer may keep go on; its largest share decides
        # (uncompressed full-attention layers need every token; sliding layers make do with what they get)
        need = [lay.top_ratio if lay.compressible else (None if lay.is_sliding else 1.0) for lay in self.layers]
        self.forward_ratio = []
        for i in range(len(need)):
            deeper = [r for r in need[i + 1 :] if r is not None]
            self.forward_ratio.append(max(deeper) if deeper else None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_slots

    def begin(self, q_pos: torch.Tensor, q_valid: torch.Tensor) -> None:
        """Called once per forward pass, before the first layer."""
        prefill = self.seen_slots == 0
        q = q_pos.shape[1]
        last = self.late_invalid  # its pinned buffer is free once read: the next flag reuses it
        self.learn_validity()
        if prefill or q > 1 or not self.defer_validity:
            has_invalid = bool((~q_valid).any())  # one host sync per prompt or chunk, never per layer
        else:
            # a decode step never waits for the device: whether its token is padding changes nothing in this
            # pass (a padding query sees every slot, as with no mask at all, and its own output is never read),
            # only the masks of later passes, so the layers learn it at the next pass or trim (`learn_validity`)
            has_invalid = False
            host = last.host if last is not None and last.event is not None else None
            self.late_invalid = LateFlag((~q_valid).any(), host if q_valid.is_cuda else None)
        self.step = Step(
            q_pos=q_pos,
            q_valid=q_valid,
            has_invalid=has_invalid,
            prefill=prefill,
            trim_now=self._trims_due(prefill, q),
            seen_slots=self.seen_slots + q,
        )
        added = q_valid.sum(-1)
        self.seen_valid = added if self.seen_valid is None else self.seen_valid + added
        self.seen_slots += q_pos.shape[1]

    def learn_validity(self) -> None:
        """If the last decode step fed a padding token, mark every layer as holding invalid slots (then masks and
        scores look at validity). Called before anything reads that: the next pass, a trim, a fork, an inspection."""
        late, self.late_invalid = self.late_invalid, None
        if late is not None and late.read():
            for unit in (u for layer in self.layers for u in layer.units()):
                unit.has_invalid = True

    def _trims_due(self, prefill: bool, fed: int) -> list[bool]:
        """Per layer, whether it trims after this pass: right after prefill, then once every `decode.interval` fed
        tokens. Counting fed tokens (not the excess over a target) makes the moments the same for a row alone and
        in a padded batch, so its output does not depend on its neighbours; the scoring cost is paid once per
        interval. With `decode.stagger` layer i starts i * interval // L tokens into its interval."""
        interval, layers = self.schedule.decode.interval, len(self.layers)
        if prefill:
            stagger = self.schedule.decode.stagger
            self.since_trim = [i * interval // layers if stagger else 0 for i in range(layers)]
            return [True] * layers
        due = []
        for i in range(layers):
            self.since_trim[i] += fed
            due.append(self.since_trim[i] >= interval)
            if due[-1]:
                self.since_trim[i] = 0
        return due

    def end(self) -> None:
        self.step = None

    def update(self, key_states, value_states, layer_idx: int, *args, kwargs=None, **extra):
        layer = self.layers[layer_idx]
        layer.append(key_states, value_states, self.step)
        if kwargs is not None:
            # the attention function receives this same dict: it is how it finds the layer and the step
            kwargs["pyramid"] = (self, layer_idx)
        if isinstance(layer, RaggedLayer):  # the attention function reads each head's own buffers
            return key_states, value_states
        return layer.keys, layer.values

    def after_attention(self, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
        """Remember the recent queries, then trim the layer (and, in drop mode, plan what goes on)."""
        layer, step, schedule = self.layers[layer_idx], self.step, self.schedule
        parts = layer.parts(query)
        for unit, _ in parts:
            unit.scaling = scaling  # a plain layer is its own one unit
        layer.remember_queries(query, step)  # once per layer: a split layer's heads read views of it
        due = [unit.due(schedule, self.seen_slots, step.trim_now[layer_idx]) for unit, _ in parts]
        m_max = self._forward_due(layer_idx)
        if m_max is not None or any(k is not None for k in due):
            self.learn_validity()  # trims run eagerly: scoring may wait for the device
            scores = [unit.scores(schedule, scaling) for unit, _ in parts]
            if m_max is not None:  # scored over all of this pass's tokens (every head holds them), before any cut
                self._plan_forward(layer_idx, torch.cat(scores, 1).mean(1, keepdim=True), m_max)
            for (unit, _), s, k_max in zip(parts, scores, due, strict=True):
                if k_max is not None:
                    unit.trim(s, schedule, self.seen_valid.to(unit.device), k_max)
            layer.settle()  # only where something was trimmed: it checks every head's buffers
        if layer.is_sliding:
            layer.trim_window()

    def _forward_due(self, layer_idx: int) -> int | None:
        ratio = self.forward_ratio[layer_idx]
        step = self.step
        if self.schedule.prefill_mode != "drop" or not step.prefill or ratio is None or ratio >= 1.0:
            return None
        m_max = kept_tokens(ratio, self.seen_slots, self.schedule.sinks, self.schedule.window)
        return m_max if m_max < step.q_pos.shape[1] else None

    def _plan_forward(self, layer_idx: int, scores: torch.Tensor, m_max: int) -> None:
        step, s = self.step, self.schedule
        dev = scores.device
        step.q_pos, step.q_valid = step.q_pos.to(dev), step.q_valid.to(dev)
        if step.kept_idx is not None:
            step.kept_idx = step.kept_idx.to(dev)
        valid = step.q_valid[:, None, :]
        keep = selection.kept_counts(self.forward_ratio[layer_idx], self.seen_valid.to(dev), s.sinks, s.window)
        idx, kept = selection.choose(scores, valid, selection.protected_mask(valid, s.sinks, s.window), keep, m_max)
        step.forward_idx = idx[:, 0]
        step.kept_idx = idx[:, 0] if step.kept_idx is None else torch.gather(step.kept_idx, 1, idx[:, 0])
        step.q_pos = torch.gather(step.q_pos, 1, step.forward_idx)
        # without padding every row keeps all m_max slots, so has_invalid stays as it was
        step.q_valid = torch.gather(step.q_valid, 1, step.forward_idx) & kept[:, 0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.seen_valid is not None:
            self.seen_valid = self.seen_valid.index_select(0, beam_idx.to(self.seen_valid.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.seen_valid is not None:
            self.seen_valid = self.seen_valid[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.seen_valid is not None:
            self.seen_valid = self.seen_valid.repeat_interleave(repeats, dim=0)

    def reserve(self, tokens: int) -> None:
        """Allocate, now, room for `tokens` more slots in every layer that keeps one buffer for all its heads.

        A fork made with `into_room=True` appends into that room instead of copying the layer's slots at its
        first append: calibration scores many candidates, one after the other, from one prefilled cache.
        """
        for layer in self.layers:
            if isinstance(layer, PyramidLayer):
                layer.reserve(tokens)

    def fork(self, schedule: Schedule, into_room: bool = False) -> PyramidCache:
        """A new cache under `schedule` that starts from this one's contents (shares tensors, copies nothing).

        Calibration prefills once with an all-ones schedule and a wide query window, then forks that cache for
        every candidate schedule and calls `compress_now`: evict mode needs no second prefill. Evaluation forks a
        compressed cache to score one continuation and generate another from the same state; a layer already
        split by head stays split, each head forked alone.

        `into_room`: the fork's layers that it does not trim append into this cache's spare room (`reserve`)
        instead of copying their slots first. This cache reads only its own slots, so it is unchanged; but every
        such fork writes the same room, so use one at a time, and never append to this cache while one is in use.
        """
        self.learn_validity()
        other = PyramidCache.__new__(PyramidCache)
        layers = []
        for i, layer in enumerate(self.layers):
            heads = schedule.layer_head_ratios(i)
            if isinstance(layer, RaggedLayer):
                shares = heads or [schedule.ratios[i]] * len(layer.heads)
                if len(shares) != len(layer.heads):
                    raise ValueError(f"layer {i} holds {len(layer.heads)} KV heads, the schedule gives {len(shares)}")
                ring = QueryRing.of(layer.ring, schedule.window, schedule.decode.interval)
                heads = [_forked(u, r, schedule) for u, r in zip(layer.heads, shares, strict=True)]
                forked = RaggedLayer(heads, ring)
                forked.is_initialized, forked.device = layer.is_initialized, layer.device
            else:
                forked = _forked(layer, schedule.ratios[i], schedule, into_room)
                if heads is not None and forked.compressible:
                    forked = RaggedLayer.split(forked, heads)
            layers.append(forked)
        Cache.__init__(other, layers=layers)
        other.schedule = schedule
        other.seen_slots, other.seen_valid, other.step = self.seen_slots, self.seen_valid, None
        other.since_trim = [0] * len(other.layers)
        other.ragged_kernel = self.ragged_kernel
        other.late_invalid = None
        other.forward_ratio = [None] * len(other.layers)
        return other

    @classmethod
    def cat_rows(cls, caches: list[PyramidCache]) -> PyramidCache:
        """One cache holding the rows of `caches`, one after the other: the row chunks of one batch, each prefilled
        alone to the same padded length under the same schedule (`runtime.prefill_rows`).

        Each layer is merged in turn and then dropped from the chunk caches, so the merge holds one layer twice
        at most, not the whole cache; the chunk caches are left empty. Everything that can be checked is checked
        before any chunk is touched; a failure while merging (out of memory) leaves the chunk caches unusable.
        """
        if not caches:
            raise ValueError("PyramidCache.cat_rows needs at least one cache")
        for i, c in enumerate(caches):
            if not isinstance(c, PyramidCache):
                raise ValueError(f"PyramidCache.cat_rows: caches[{i}] is {describe(c)}, not a PyramidCache")
            if c.step is not None:
                raise ValueError(f"PyramidCache.cat_rows: caches[{i}] is inside a forward pass; merge between passes")
        first = caches[0]
        if any(c.schedule is not first.schedule and c.schedule != first.schedule for c in caches):
            raise ValueError("PyramidCache.cat_rows: the row chunks ran under different schedules")
        if len({c.seen_slots for c in caches}) > 1:
            raise ValueError(
                f"PyramidCache.cat_rows: the row chunks were fed {sorted({c.seen_slots for c in caches})} tokens; "
                "chunks of one batch must be fed the same padded length"
            )
        if any(c.since_trim != first.since_trim for c in caches):
            raise ValueError(
                "PyramidCache.cat_rows: the row chunks are at different points of their trim intervals (fed in "
                "other passes); prefill every chunk in one pass"
            )
        for c in caches:
            c.learn_validity()
        for i in range(len(first.layers)):
            held = {(type(c.layers[i]).__name__, tuple(u.stored() for u in c.layers[i].units())) for c in caches}
            if len(held) > 1:
                raise ValueError(
                    f"PyramidCache.cat_rows: layer {i} differs between the row chunks ({sorted(held)}: kind, slots "
                    "per unit); chunks of one batch must be fed the same padded length under the same schedule"
                )
        out = copy.copy(first)
        out.layers = []
        for i in range(len(first.layers)):
            parts = [c.layers[i] for c in caches]
            out.layers.append(type(parts[0]).cat_rows(parts, f"PyramidCache.cat_rows, layer {i}"))
            for c in caches:
                c.layers[i] = None  # freed now: the merged copy holds its rows
        out.seen_valid = None if first.seen_valid is None else torch.cat([c.seen_valid for c in caches])
        out.since_trim = list(first.since_trim)
        out.late_invalid, out.step = None, None
        for c in caches:
            c.layers = []
        return out

    def compress_now(self) -> None:
        """Trim every layer to its share of the tokens seen so far, as right after a prefill."""
        self.learn_validity()
        for unit in (u for layer in self.layers for u in layer.units()):
            k_max = unit.due(self.schedule, self.seen_slots, trim_now=True)
            if k_max is not None:
                unit.trim(unit.scores(self.schedule, unit.scaling), self.schedule, self.seen_valid, k_max)
        for layer in self.layers:
            layer.settle()

    def stored_lengths(self) -> list[int]:
        return [layer.stored() for layer in self.layers]


def _expect_cache(cache: object, caller: str) -> None:
    # anything without cache layers used to count as 0 bytes: a wrong argument read as an empty cache
    if not isinstance(cache, Cache):
        raise TypeError(
            f"runtime.{caller}: expected a transformers Cache (such as a PyramidCache), got {describe(cache)}; pass "
            "runtime.cache_of(out) of model.generate(..., return_dict_in_generate=True) or of a model(...) call"
        )


def kv_bytes(cache: Cache) -> int:
    """Bytes the cache really holds in keys and values, spare room included (any transformers Cache)."""
    _expect_cache(cache, "kv_bytes")
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, AnyLayer):
            total += layer.kv_nbytes()
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def cache_bytes(cache: Cache) -> int:
    """All bytes the cache holds: keys, values and our per-slot bookkeeping (positions, validity, recent queries)."""
    _expect_cache(cache, "cache_bytes")
    extra = sum(layer.bookkeeping_nbytes() for layer in getattr(cache, "layers", []) if isinstance(layer, AnyLayer))
    return kv_bytes(cache) + extra
