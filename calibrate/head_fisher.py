"""Per-head sensitivity from a few backward passes instead of one forward per head and ratio.

Compressing KV head h of layer l at ratio r changes only that layer's attention output at the continuation
positions, and only in the columns of h's query group, by delta (the layers below see nothing). To second order
the KL that follows is a quadratic form, KL ~ 1/2 sum_t delta' J_t' F_t J_t delta, with J_t the Jacobian of
position t's logits w.r.t. layer l's attention output and F_t the Fisher of its next-token distribution. With y_t
drawn from the full cache's distribution and g = d/dx sum_t log p_t(y_t) (one backward pass for every layer at
once), E[(g . delta)^2] is exactly that form, so

    KL(l, h, r) ~ 1/2 mean over samples of (g . delta_{l,h,r})^2

and delta costs one layer's attention, not a forward through the layers above. Heads select their tokens on
their own (per-head selection), so one run of layer l compressed at r gives every head's delta at once. The
estimate's level is off where the curve is not quadratic (small ratios), so `calibrate` uses it only for how a
layer's measured KL splits over its heads (`head_curves.from_shares`): the per-layer curves stay measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache

import runtime
from runtime.families import decoder_layers
from runtime.schedule import Schedule

from .scoring import Evaluator, one_part_compressed

# gradient samples per batch: on SmolLM2 the allocation the estimate gives at 48 loses 1-4% in the screen against
# the measured curves (docs/method.md); fewer samples give noisier shares
SAMPLES = 48
# a gradient sample (a backward pass through every layer) costs roughly 12 times one layer's changes at every grid
# ratio (timed once on SmolLM2, make run's data: 3 text rows x 128 tokens over 1024, 1.10 s against 0.084 s; the
# retrieval tasks' batch 0.66 s against 0.076 s): only the progress bar's weights
SAMPLE_WORK = 12.0


class _Captured(Exception):
    """Raised by the hook that caught the attention output it was waiting for: nothing above it need run."""


@contextlib.contextmanager
def _perturbable_outputs(model, zeros: Sequence[torch.Tensor]) -> Iterator[None]:
    """Add `zeros[l]` (leaves that require grad) to every layer's attention output before its output projection,
    so that the gradient w.r.t. `zeros[l]` is the gradient w.r.t. that output, through every layer above."""
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, z=z: (args[0] + z, *args[1:]))
        for layer, z in zip(decoder_layers(model), zeros, strict=True)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# a profile runs in inference mode, whose tensors autograd cannot save: this pass leaves it
@torch.inference_mode(False)
@torch.enable_grad()
def sampled_gradients(
    evaluator: Evaluator,
    batch: int,
    samples: int,
    generator: torch.Generator,
    each: Callable[[list[torch.Tensor]], None],
) -> None:
    """Calls `each(grads)` once per sample, `grads[l]` [b, n, Hq * D] = d/dx sum over the batch's scored tokens of
    log p(y), y drawn from the full cache's distribution, x layer l's attention output at the continuation
    positions. The stock model runs the continuation over a copy of the full prefilled cache (nothing is
    compressed); the graph is kept across samples, so a batch costs one forward and `samples` backward passes."""
    model, ev = evaluator.model, evaluator
    idx = ev.batches[batch]
    positions = ev.positions[batch]
    n = int(positions[-1]) + 1
    cont = torch.stack([ev.examples[j].continuation[:n] for j in idx]).to(model.device)
    past = DynamicCache(config=model.config)
    for layer in range(ev.layers):
        (kept,) = runtime.inspect.kept(ev.caches[batch], layer)
        if not bool(kept.valid.all()):
            raise ValueError(f"layer {layer} of the full cache has unused slots; it must hold every prompt token")
        # clones made outside inference mode: the cache's own tensors cannot be saved for backward
        past.update(kept.keys.clone(), kept.values.clone(), layer)
    width = decoder_layers(model)[0].self_attn.o_proj.in_features
    zeros = [torch.zeros(len(idx), n, width, device=model.device, requires_grad=True) for _ in range(ev.layers)]
    with _perturbable_outputs(model, zeros):
        logits = model(cont, cache=past, logits_to_keep=positions.to(model.device)).logits.float()
        probs = torch.softmax(logits.detach(), -1)  # [b, P, V]
        scored = ev.scored[batch].to(probs.dtype)[..., None]  # [b, P, 1]
        cdf = probs.flatten(0, 1).cumsum(-1, dtype=torch.float64)  # the same distribution for every sample
        if not bool(torch.isfinite(cdf[:, -1]).all()):
            raise ValueError(f"batch {batch}: the model's next-token probabilities are not finite (NaN or inf logits)")
        # d log softmax(z)[y] / dz = onehot(y) - p, counted only where the row scores: -p * scored, plus
        # `scored` at y (one pass per sample instead of building a one-hot); probs is not read again
        base = probs.mul_(-scored)
        out = torch.empty_like(base)
        for s in range(samples):
            y = draw(cdf, generator).view(*probs.shape[:2], 1)
            out.copy_(base).scatter_add_(-1, y, scored)
            grads = torch.autograd.grad(logits, zeros, grad_outputs=out, retain_graph=s + 1 < samples)
            each(list(grads))


def draw(cdf: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[N]: one token per row of `cdf` [N, V] (cumulative probabilities, float64), drawn by inverting it: what
    `torch.multinomial(probs, 1)` draws, in distribution, at a search per row instead of the passes over the
    vocabulary it makes on every call (CPU, 384 rows of 49152 tokens: 0.3 s against 0.15 ms). `generator` is a CPU
    one: the same draws on any device."""
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype).to(cdf.device) * cdf[:, -1:]
    # the first token whose cumulative probability exceeds u: token i with probability p_i, none with p_i = 0 (the
    # clamp only catches a u rounded up to the total)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).view(-1)


@torch.inference_mode()
def attention_output(evaluator: Evaluator, batch: int, schedule: Schedule, layer: int) -> torch.Tensor:
    """[b, n, Hq * D]: `layer`'s attention output (before its output projection) at the continuation positions,
    under `schedule`, which compresses nothing below `layer` (evict mode, run from that layer on)."""
    model = evaluator.model
    seen: list[torch.Tensor] = []

    def catch(module, args):
        seen.append(args[0].float())
        raise _Captured

    handle = decoder_layers(model)[layer].self_attn.o_proj.register_forward_pre_hook(catch)
    try:
        with runtime.apply(model, schedule):
            cache = evaluator.compressed_cache(batch, schedule)
            evaluator.continuation_logits(evaluator.batches[batch], schedule, cache, from_layer=layer)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen[0]


def batch_terms(
    evaluator: Evaluator,
    batch: int,
    base: Schedule,
    layers: Sequence[int],
    grid: Sequence[float],
    heads: int,
    samples: int,
    generator: torch.Generator,
    tick: Callable[[float], None] = lambda work: None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([L, H, G], [L, G]): one batch's summed second-order KL estimates (over its rows' scored tokens) when one
    head, or the whole layer, of each of `layers` keeps grid[g] of its context (`base`, which keeps every token,
    elsewhere). `tick(work)` after each layer's changes (work 1) and each sample (`SAMPLE_WORK`)."""
    deltas: dict[tuple[int, int], torch.Tensor] = {}
    for layer in layers:
        full = attention_output(evaluator, batch, base, layer)
        for g, ratio in enumerate(grid):
            # every head at `ratio`: each selects alone, so its columns are those of it alone at `ratio`
            whole_layer = one_part_compressed(base, layer, 0, ratio, None)
            deltas[layer, g] = attention_output(evaluator, batch, whole_layer, layer) - full
        tick(1.0)
    per_head = torch.zeros(evaluator.layers, heads, len(grid), dtype=torch.float64)
    per_layer = torch.zeros(evaluator.layers, len(grid), dtype=torch.float64)

    @torch.inference_mode()  # the sums were made in it (a profile's mode)
    def each(grads: list[torch.Tensor]) -> None:
        for (layer, g), delta in deltas.items():
            rows, n, _ = delta.shape
            a = (grads[layer] * delta).view(rows, n, heads, -1).sum((1, 3)).double()  # [b, H]: each row, each head
            per_head[layer, :, g] += (a**2).sum(0).cpu()
            per_layer[layer, g] += (a.sum(1) ** 2).sum().cpu()
        tick(SAMPLE_WORK)

    sampled_gradients(evaluator, batch, samples, generator, each)
    return 0.5 * per_head / samples, 0.5 * per_layer / samples


def fisher_kl(
    evaluators: Sequence[Evaluator],
    base: Schedule,
    layers: Sequence[int],
    grid: Sequence[float],
    heads: int,
    samples: int = SAMPLES,
    seed: int = 0,
    progress: Callable[..., None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([K, L, H, G] per-head, [K, L, G] per-layer) second-order KL estimates per token, per evaluator (see the
    module docstring); the layer's is that of all its heads compressed at once (their deltas together). Layers
    not in `layers` stay 0. `progress(phase, done, total, work=(done_work, total_work))` after each layer's
    changes and each gradient sample of each batch."""
    per_head = torch.zeros(len(evaluators), evaluators[0].layers, heads, len(grid))
    per_layer = torch.zeros(len(evaluators), evaluators[0].layers, len(grid))
    steps = [(k, b) for k, ev in enumerate(evaluators) for b in range(len(ev.batches))]
    # a batch's work follows its rows x continuation tokens
    size = [len(evaluators[k].batches[b]) * (int(evaluators[k].positions[b][-1]) + 1) for k, b in steps]
    scale = 1.0 / max(size)
    total = sum(s * scale * (len(layers) + samples * SAMPLE_WORK) for s in size)
    count, done = len(steps) * (len(layers) + samples), {"ticks": 0, "work": 0.0}
    scored = [sum(float(s.sum()) for s in ev.scored) for ev in evaluators]  # tokens each evaluator scores
    for (k, b), rows_tokens in zip(steps, size, strict=True):
        ev = evaluators[k]

        def tick(work: float, weight: float = rows_tokens * scale) -> None:
            done["ticks"] += 1
            done["work"] += work * weight
            if progress:
                progress("head sensitivity (Fisher)", done["ticks"], count, work=(done["work"], total))

        generator = torch.Generator().manual_seed(seed * 1_000_003 + k * 1_009 + b)  # the same draws on a rerun
        h, lay = batch_terms(ev, b, base, layers, grid, heads, samples, generator, tick)
        per_head[k] += (h / scored[k]).float()
        per_layer[k] += (lay / scored[k]).float()
    return per_head, per_layer
