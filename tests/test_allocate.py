"""Water-filling a budget over layers from sensitivity curves (pure functions)."""

import pytest

from calibrate.allocate import blend, convex_hull, equal_weight, water_fill

GRID = [0.1, 0.5]


def test_convex_hull_drops_points_above_the_chord():
    assert convex_hull([(0.0, 1.0), (0.5, 0.9), (1.0, 0.0)]) == [(0.0, 1.0), (1.0, 0.0)]
    assert convex_hull([(0.0, 1.0), (0.5, 0.1), (1.0, 0.0)]) == [(0.0, 1.0), (0.5, 0.1), (1.0, 0.0)]


def test_budget_goes_to_the_sensitive_layer_first():
    curves = [[0.01, 0.005], [1.0, 0.5], [0.02, 0.01]]  # layer 1 is the sensitive one
    ratios = water_fill(curves, GRID, mean_ratio=0.4)
    assert sum(ratios) == pytest.approx(1.2)
    assert ratios[1] == pytest.approx(1.0)  # steepest: gets all it can use
    assert ratios[0] == pytest.approx(0.1) and ratios[2] == pytest.approx(0.1)


def test_hand_computed_partial_segment():
    # layer 0 hull: (0.1, 0.4) -> (0.5, 0.2) slope -0.5 -> (1, 0) slope -0.4; layer 1 flat at 0 (no gain)
    curves = [[0.4, 0.2], [0.0, 0.0]]
    ratios = water_fill(curves, GRID, mean_ratio=0.35)  # total 0.7: 0.2 spent at start, 0.5 to give
    assert ratios == pytest.approx([0.6, 0.1])


def test_tiny_budget_and_non_compressible_layers():
    assert water_fill([[1, 1], [1, 1]], GRID, mean_ratio=0.01) == [0.1, 0.1]
    out = water_fill([[1, 0.5], [9, 9], [1, 0.5]], GRID, mean_ratio=0.3, compressible=[True, False, True])
    assert out[1] == 1.0 and sum(out[::2]) == pytest.approx(0.6)


def test_blend():
    assert blend([0.0, 1.0], [1.0, 1.0], 0.25) == [0.25, 1.0]


def test_equal_weight_lets_a_small_scale_kind_count():
    text = [[0.02, 0.01], [0.0, 0.0], [0.001, 0.0005]]  # text needs layer 0
    tasks = [[0.0, 0.0], [3.0, 2.0], [0.0, 0.0]]  # retrieval needs layer 1, in far larger nats
    plain = [[(a + b) / 2 for a, b in zip(x, y)] for x, y in zip(text, tasks)]
    assert water_fill(plain, GRID, mean_ratio=0.4)[0] == pytest.approx(0.1)  # the tasks' nats decide alone
    both = equal_weight([text, tasks], [True] * 3)
    ratios = water_fill(both, GRID, mean_ratio=0.4)
    assert ratios[0] > 0.1 and ratios[1] > 0.1 and sum(ratios) == pytest.approx(1.2)
    # each kind is divided by its own mean: scaling one kind changes nothing
    scaled = equal_weight([text, [[10 * v for v in r] for r in tasks]], [True] * 3)
    assert sum(scaled, []) == pytest.approx(sum(both, []))
    # a non-compressible layer does not count towards a kind's scale
    assert equal_weight([[[1.0], [0.0]], [[2.0], [0.0]]], [True, False]) == [[1.0], [0.0]]


def test_per_head_allocation_and_its_predicted_kl():
    """The `heads` shape water-fills over every KV head; the schedule meets the budget and selects per head."""
    import torch

    from calibrate.profiling import Profile
    from calibrate.search_space import HEADS, Space
    from runtime.schedule import ModelInfo, Selection

    head_parts = torch.tensor([[[[1.0, 0.5], [0.01, 0.005]], [[0.02, 0.01], [0.01, 0.005]]]])  # [K=1, L=2, H=2, G]
    zeros = torch.zeros(2, 2)
    prof = Profile(
        grid=GRID,
        windows=[32],
        recall=zeros,
        overlap=zeros,
        window_recall=torch.zeros(2, 1),
        sensitivity=head_parts[0].mean(1),
        compressible=[True, True],
        parts=head_parts.mean(2),
        part_names=["text"],
        head_parts=head_parts,
    )
    info = ModelInfo(name="t", num_layers=2, num_kv_heads=2, head_dim=8, fingerprint="f", compressible=[True, True])
    space = Space(0.4, 1000, prof, info, sinks=4, windows=[32], default_window=32)
    assert HEADS in space.shapes
    schedule = space.build(HEADS, 32, {}, Selection(per_head=False))
    shares = schedule.head_ratios
    assert shares[0][0] == max(max(row) for row in shares)  # the sensitive head gets the most
    assert schedule.selection.per_head and abs(schedule.kv_fraction(1000) - 0.4) < 4 / 1000
    # additivity check: the sum of single-head KLs, interpolated in the grid (0 at ratio 1)
    flat = [[0.1, 0.1], [0.1, 0.1]]
    assert prof.predicted_kl([0.1, 0.1], flat) == pytest.approx(1.0 + 0.01 + 0.02 + 0.01)
    assert prof.predicted_kl([1.0, 1.0], [[1.0, 1.0], [1.0, 1.0]]) == 0.0
    # a profile without per-head curves offers no `heads` shape
    prof.head_parts = None
    assert HEADS not in space.shapes
