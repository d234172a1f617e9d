"""Head curves measured at some grid points, the rest from the layer curve's shape (`calibrate.head_curves`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scoring import examples
from tiny_models import tiny_model

from calibrate import profiling
from calibrate.errors import CalibrateError
from calibrate.head_curves import check_points, from_layer_shape
from calibrate.scoring import Evaluator
from calibrate.settings import head_points_from_arg

GRID = list(profiling.GRID)


def test_every_point_measured_gives_the_measurement_back():
    measured = torch.rand(2, 3, 4, len(GRID))
    layer = torch.rand(2, 3, len(GRID))
    out = from_layer_shape(layer, measured, GRID, list(range(len(GRID))))
    assert torch.equal(out, measured)


@given(st.lists(st.sampled_from(range(len(GRID))), min_size=1, max_size=len(GRID), unique=True))
@settings(max_examples=30, deadline=None)
def test_a_head_proportional_to_its_layer_is_rebuilt_exactly(points):
    g = torch.Generator().manual_seed(len(points))
    layer = torch.rand(2, 3, len(GRID), generator=g) + 0.01  # [K, L, G]
    scale = torch.rand(2, 3, 4, 1, generator=g)  # each head a fixed share of its layer
    full = layer[:, :, None, :] * scale
    points = sorted(points)
    out = from_layer_shape(layer, full[..., points], GRID, points)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-7)
    assert torch.equal(out[..., points], full[..., points])  # measured values are kept as measured


def test_between_two_points_the_head_layer_ratio_is_interpolated():
    layer = torch.tensor([[[1.0, 2.0, 4.0, 8.0, 16.0]]])  # [1, 1, G]
    measured = torch.tensor([[[[0.5, 8.0]]]])  # head at 0.02 and 0.5: ratio 0.5 and 0.5 -> 0.5 everywhere
    out = from_layer_shape(layer, measured, GRID, [0, 4])
    torch.testing.assert_close(out[0, 0, 0], layer[0, 0] * 0.5)
    measured = torch.tensor([[[[1.0, 0.0]]]])  # ratio 1 at 0.02, 0 at 0.5: linear in the ratio between them
    out = from_layer_shape(layer, measured, GRID, [0, 4])
    t = (0.1 - 0.02) / (0.5 - 0.02)
    assert float(out[0, 0, 0, 2]) == pytest.approx(4.0 * (1 - t))


def test_points_outside_the_grid_are_refused_by_name():
    assert check_points([0.5, 0.02], GRID) == [0, 4]
    with pytest.raises(ValueError, match=r"\[0.3\] are not in it"):
        check_points([0.02, 0.3], GRID)
    with pytest.raises(ValueError, match="non-empty"):
        check_points([], GRID)


@pytest.mark.parametrize("text", ["0.3", "0.02,x", "", ",", "all,0.5"])
def test_the_option_names_a_bad_value_and_the_fix(text):
    with pytest.raises(CalibrateError, match=f"--head-points '{text}'.*give e.g. 0.02,0.1,0.5"):
        head_points_from_arg(text)


def test_the_option_reads_all_and_ratios():
    assert head_points_from_arg(None) is None
    assert head_points_from_arg("all") == GRID
    assert head_points_from_arg("0.5,0.02") == [0.02, 0.5]
    assert head_points_from_arg("0.5, 0.5,0.10") == [0.1, 0.5]  # each once, as the grid spells it


def test_a_profile_at_fewer_head_points_measures_the_same_values_there():
    """The shortcut measures less, not differently: at its points the head curves are the full profile's."""
    model = tiny_model("llama", kv_heads=2)
    ev = Evaluator(model, examples(n=2, context=96), query_window=16, sinks=2, batch_size=2)
    full = profiling.measure(model, ev, sinks=2, window=8, per_head=True)
    fewer = profiling.measure(model, ev, sinks=2, window=8, per_head=True, head_points=[0.02, 0.1, 0.5])
    assert torch.equal(full.parts, fewer.parts)
    points = [0, 2, 4]
    assert torch.equal(fewer.head_parts[..., points], full.head_parts[..., points])
    expected = from_layer_shape(full.parts, full.head_parts[..., points], full.grid, points)
    assert torch.equal(fewer.head_parts, expected)
    assert fewer.meta["head_points"] == [0.02, 0.1, 0.5] and full.meta["head_points"] == GRID
    assert float(full.head_parts.sum()) > 0


def test_head_points_without_head_curves_is_refused(tmp_path, capsys):
    from calibrate.cli import main

    assert main(["profile", "--no-per-head", "--head-points", "0.02,0.5", "--out", str(tmp_path / "s.json")]) == 2
    assert "--no-per-head skips them; give one" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_default_key_is_the_key_of_profiles_measured_before_the_option():
    from calibrate.settings import Settings

    assert "head_points" not in Settings().keyed()
    assert Settings(head_points=[0.02, 0.1, 0.5]).key() != Settings().key()
