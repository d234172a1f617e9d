"""The second-order (Fisher) head estimate: what it differentiates is the stock attention output, one layer run
gives every head's change, and for small changes it is the measured KL."""

from __future__ import annotations

import pytest
import torch
from test_scoring import examples
from tiny_models import tiny_model

from calibrate.head_curves import from_shares
from calibrate.head_fisher import attention_output, draw, fisher_kl
from calibrate.scoring import Evaluator, one_part_compressed
from runtime.schedule import Schedule

GRID = [0.3, 0.6, 0.9]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", kv_heads=2)
    ev = Evaluator(model, examples(n=4, context=96, continuation=16), query_window=16, sinks=2, batch_size=2)
    return ev, Schedule(ratios=[1.0] * ev.layers, window=8, sinks=2)


def test_a_layer_run_gives_each_heads_own_change(setup):
    """Heads select alone: compressing the whole layer changes head h's columns exactly as compressing h alone,
    and compressing h alone leaves the other heads' columns as they were."""
    ev, base = setup
    full = attention_output(ev, 0, base, 1)
    whole = attention_output(ev, 0, one_part_compressed(base, 1, 0, 0.3, None), 1) - full
    width = full.shape[-1] // 2
    for h in range(2):
        alone = attention_output(ev, 0, one_part_compressed(base, 1, h, 0.3, 2), 1) - full
        own = slice(h * width, (h + 1) * width)
        other = slice((1 - h) * width, (2 - h) * width)
        assert alone[..., own].abs().max() > 1e-3  # the head really changed
        torch.testing.assert_close(alone[..., own], whole[..., own], rtol=0, atol=1e-6)
        assert alone[..., other].abs().max() <= 1e-6


def test_attention_output_under_the_full_cache_is_the_stock_models(setup):
    ev, base = setup
    model = ev.model
    seen = []
    layer = model.model.layers[2].self_attn.o_proj
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].float()))
    try:
        with torch.inference_mode():
            idx = ev.batches[0]
            n = int(ev.positions[0][-1]) + 1
            ids = torch.stack([torch.cat([ev.examples[j].context, ev.examples[j].continuation[:n]]) for j in idx])
            model(ids)
    finally:
        handle.remove()
    context = ev.examples[0].context.numel()
    torch.testing.assert_close(attention_output(ev, 0, base, 2), seen[0][:, context:], rtol=1e-4, atol=1e-5)


def test_estimate_is_the_measured_kl_for_small_changes(setup):
    """On a tiny model, with many samples, layer and head estimates are within 15% of the measured KL."""
    ev, base = setup
    heads, layers = fisher_kl([ev], base, [1, 2], GRID, 2, samples=400, seed=0)
    assert heads[0, 0].abs().max() == 0 and layers[0, 3].abs().max() == 0  # layers not asked for stay 0
    for layer in (1, 2):
        for g, ratio in enumerate(GRID):
            measured = ev.score(one_part_compressed(base, layer, 0, ratio, None)).kl
            assert float(layers[0, layer, g]) == pytest.approx(measured, rel=0.15)
            for h in range(2):
                measured = ev.score(one_part_compressed(base, layer, h, ratio, 2)).kl
                assert float(heads[0, layer, h, g]) == pytest.approx(measured, rel=0.15)


def test_draws_follow_each_rows_distribution():
    """Inverting the cumulative distribution draws token i of a row with its probability (as torch.multinomial
    does), never a token of probability 0, and the same tokens again from the same seed."""
    # the last row sums to 0.5, as float rounding never makes a row sum to exactly 1
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2, 0.2],
                          [0.05, 0.0, 0.3, 0.15, 0.0]])  # fmt: skip
    rows, n = len(probs), 20_000
    cdf = probs.double().cumsum(-1).repeat(n, 1)
    y = draw(cdf, torch.Generator().manual_seed(0)).view(n, rows)
    assert torch.equal(y, draw(cdf, torch.Generator().manual_seed(0)).view(n, rows))
    for row in range(rows):
        freq = torch.bincount(y[:, row], minlength=5).double() / n
        assert freq[probs[row] == 0].sum() == 0
        want = probs[row].double() / probs[row].sum()
        assert torch.allclose(freq, want, atol=4 * (0.25 / n) ** 0.5)  # 4 standard errors at most


def test_estimate_reruns_the_same(setup):
    ev, base = setup
    a = fisher_kl([ev], base, [1], GRID[:1], 2, samples=4, seed=3)
    b = fisher_kl([ev], base, [1], GRID[:1], 2, samples=4, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_from_shares_splits_the_measured_layer_curve():
    layer = torch.tensor([[[2.0, 1.0]]])  # [K=1, L=1, G=2]
    heads = torch.tensor([[[[3.0, 0.0], [1.0, 0.0]]]])  # [1, 1, H=2, 2]: nothing changed at the second ratio
    est_layer = torch.tensor([[[4.0, 0.0]]])
    out = from_shares(layer, heads, est_layer)
    torch.testing.assert_close(out, torch.tensor([[[[1.5, 0.0], [0.5, 0.0]]]]))


def test_a_fisher_profile_splits_its_measured_layer_curves(monkeypatch):
    """`measure(head_curves="fisher")`: the layer curves are the measured ones, split by `fisher_kl`'s estimate,
    and a checkpoint holding the estimate resumes it."""
    from calibrate import profiling

    model = tiny_model("llama", kv_heads=2)
    ev = Evaluator(model, examples(n=2, context=96), query_window=16, sinks=2, batch_size=2)
    measured = profiling.measure(model, ev, sinks=2, window=8, per_head=False)

    class Store:
        def __init__(self, tensors=None):
            self.tensors = dict(tensors or {})

        def get(self, name):
            return self.tensors.get(name)

        def put(self, tensors):
            self.tensors.update(tensors)

    store = Store()
    fisher = profiling.measure(model, ev, sinks=2, window=8, per_head=True, head_curves="fisher", checkpoint=store)
    assert torch.equal(fisher.parts, measured.parts)
    assert fisher.meta["head_curves"]["method"] == "fisher" and "head_points" not in fisher.meta
    comp = [i for i, c in enumerate(fisher.compressible) if c]
    base = Schedule(ratios=[1.0] * ev.layers, window=8, sinks=2)
    heads, layers = fisher_kl([ev], base, comp, fisher.grid, 2)
    torch.testing.assert_close(store.tensors[profiling.FISHER_CURVES], torch.cat([heads, layers[:, :, None]], 2))
    torch.testing.assert_close(fisher.head_parts, from_shares(fisher.parts, heads, layers))
    assert float(fisher.head_parts[:, comp].sum()) > 0
    monkeypatch.setattr(profiling, "fisher_kl", lambda *a, **k: pytest.fail("resumed estimate measured again"))
    again = profiling.measure(
        model, ev, sinks=2, window=8, per_head=True, head_curves="fisher", checkpoint=Store(store.tensors)
    )
    assert torch.equal(again.head_parts, fisher.head_parts)
    asked = []
    monkeypatch.setattr(profiling, "fisher_kl", lambda *a, **k: asked.append(k["samples"]) or fisher_kl(*a, **k))
    fewer = profiling.measure(model, ev, sinks=2, window=8, per_head=True, head_curves="fisher", fisher_samples=3)
    assert asked == [3] and fewer.meta["head_curves"]["samples"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--no-per-head"], "--no-per-head skips them; give one"),
        (["--head-points", "0.02,0.5"], "--head-curves fisher measures none; give one"),
    ],
)
def test_fisher_with_options_it_cannot_honour_is_refused(tmp_path, capsys, extra, message):
    from calibrate.cli import main

    assert main(["profile", "--head-curves", "fisher", *extra, "--out", str(tmp_path / "s.json")]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_fisher_profiles_have_their_own_key():
    from calibrate.settings import Settings

    assert "head_curves" not in Settings().keyed() and "fisher_samples" not in Settings().keyed()
    assert Settings(head_curves="fisher").key() != Settings().key()
    # 48 samples, as every Fisher profile before the field: the same key; another count is another profile
    assert Settings(head_curves="fisher").keyed()["fisher_samples"] == 48
    assert Settings(head_curves="fisher", fisher_samples=24).key() != Settings(head_curves="fisher").key()
    assert Settings(fisher_samples=24).key() == Settings().key()  # measured curves draw no samples


def test_the_quick_preset_estimates_head_curves_unless_told_otherwise():
    from calibrate.settings import Settings

    assert Settings.quick().head_curves == "fisher"
    assert Settings.quick().fisher_samples == 24 < Settings().fisher_samples
    assert Settings.quick(head_curves="measured").head_curves == "measured"
    assert Settings.quick(head_points=[0.02, 0.5]).head_curves == "measured"
    assert Settings.quick(per_head=False).head_curves == "measured"
    assert Settings().head_curves == "measured"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--head-curves", "fisher", "--fisher-samples", "0"], "--fisher-samples 0: the estimate needs at least 1"),
        (["--fisher-samples", "24"], "--fisher-samples 24 sets the samples of --head-curves fisher, which this run"),
        (["--quick", "--no-per-head", "--fisher-samples", "8"], "add --head-curves fisher (or --quick) or drop"),
    ],
)
def test_fisher_samples_without_the_fisher_estimate_or_below_one_are_refused(tmp_path, capsys, argv, message):
    from calibrate.cli import main

    assert main(["profile", *argv, "--out", str(tmp_path / "s.json")]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_fisher_samples_reach_the_settings():
    import argparse
    from types import SimpleNamespace

    from calibrate import options, settings

    p = argparse.ArgumentParser()
    options.add_calibration_args(p)
    for argv, want in ((["--quick"], 24), (["--quick", "--fisher-samples", "48"], 48),
                       (["--head-curves", "fisher", "--fisher-samples", "12"], 12)):  # fmt: skip
        got = settings.from_args(SimpleNamespace(**vars(p.parse_args(argv)), argv=argv))
        assert got.head_curves == "fisher" and got.fisher_samples == want, argv
