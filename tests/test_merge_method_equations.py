"""The equations of the mergekit-parity methods, pinned on hand-made tensors."""

import math

import pytest
import torch

from workers.merge import METHODS
from workers.merge.registry import TensorGroup

E1, E2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])


def run(method: str, base, tensors, model_params=None, **params) -> torch.Tensor:
    spec = METHODS[method]
    model_params = model_params or [{k: v for k, v in spec.model_params.items()} for _ in tensors]
    generators = [torch.Generator().manual_seed(i) for i in range(len(tensors))]
    return spec.fn(
        TensorGroup("w", base, tensors, model_params, {**spec.global_params, **params}, generators)
    )


def test_slerp_follows_the_great_circle_between_orthogonal_vectors():
    for t in (0.0, 0.25, 1.0):
        out = run("slerp", E1, [E2], t=t)
        torch.testing.assert_close(out, math.cos(t * math.pi / 2) * E1 + math.sin(t * math.pi / 2) * E2)


def test_slerp_of_colinear_vectors_is_linear():
    v = torch.tensor([0.3, -1.2, 2.0])
    torch.testing.assert_close(run("slerp", v, [2 * v], t=0.25), 1.25 * v)
    torch.testing.assert_close(run("slerp", v, [-v], t=0.25), 0.5 * v)  # antipodal: linear too


def test_slerp_treats_a_zero_vector_as_orthogonal():
    v = torch.tensor([0.3, -1.2, 2.0])
    out = run("slerp", torch.zeros(3), [v], t=0.5)
    torch.testing.assert_close(out, math.sin(math.pi / 4) * v)


def test_nuslerp_takes_t_from_the_weights_and_interpolates_task_vectors_around_a_base():
    base = torch.tensor([1.0, 1.0, 1.0])
    out = run("nuslerp", base, [base + E1, base + E2], [{"weight": 1.0}, {"weight": 3.0}])
    expected = base + math.sin(0.25 * math.pi / 2) * E1 + math.sin(0.75 * math.pi / 2) * E2
    torch.testing.assert_close(out, expected)
    even = run("nuslerp", None, [E1, E2], [{"weight": 1.0}, {"weight": -1.0}])  # weights sum to 0: t = 1/2
    torch.testing.assert_close(even, (E1 + E2) / math.sqrt(2))


def test_nuslerp_row_wise_interpolates_each_column():
    a = torch.stack([E1[:2], E2[:2]])  # identity: columns e1, e2
    b = torch.stack([E2[:2], E1[:2]])  # swapped columns: each orthogonal to a's
    by_rows = run("nuslerp", None, [a, b], [{"weight": 1.0}, {"weight": 1.0}], nuslerp_flatten=False)
    by_cols = run(
        "nuslerp",
        None,
        [a, b.t()],
        [{"weight": 1.0}, {"weight": 1.0}],
        nuslerp_flatten=False,
        nuslerp_row_wise=True,
    )
    torch.testing.assert_close(by_rows, torch.full((2, 2), 1 / math.sqrt(2)))
    torch.testing.assert_close(by_cols, torch.full((2, 2), 1 / math.sqrt(2)))


def test_multislerp_and_karcher_average_orthogonal_unit_vectors_on_the_sphere():
    halves = [{"weight": 0.5}, {"weight": 0.5}]
    torch.testing.assert_close(run("multislerp", None, [E1, E2], halves), (E1 + E2) / math.sqrt(2))
    torch.testing.assert_close(run("karcher", None, [E1, 3 * E2]), 2 * (E1 + E2) / math.sqrt(2))


def test_multislerp_refuses_antipodal_inputs_that_cancel():
    with pytest.raises(ValueError, match="weighted sum"):
        run("multislerp", None, [E1, -E1, E1], [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}])


def test_karcher_leaves_out_zero_vectors_but_counts_their_norm():
    out = run("karcher", None, [E1, torch.zeros(3)])
    torch.testing.assert_close(out, 0.5 * E1)


def test_model_stock_interpolates_by_the_angle_between_task_vectors():
    base = torch.zeros(3)
    same = run("model_stock", base, [E1, E1])  # cos = 1: t = 1, the average
    orthogonal = run("model_stock", base, [E1, E2])  # cos = 0: t = 0, the base
    torch.testing.assert_close(same, E1)
    torch.testing.assert_close(orthogonal, base)
    rows = run(
        "model_stock", torch.zeros(2, 2), [torch.eye(2), torch.tensor([[1.0, 0], [1, 0]])], filter_wise=True
    )
    torch.testing.assert_close(
        rows, torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    )  # row 0 agrees, row 1 is orthogonal


def test_nearswap_swaps_near_entries_and_moves_far_ones_by_t_over_distance():
    out = run("nearswap", torch.zeros(3), [torch.tensor([0.001, 0.1, -1.0])], t=0.01)
    torch.testing.assert_close(out, torch.tensor([0.001, 0.01, -0.01]))


def test_passthrough_scales_its_single_input():
    v = torch.tensor([1.0, -2.0])
    assert run("passthrough", None, [v]) is v
    torch.testing.assert_close(run("passthrough", None, [v], [{"scale": 0.5}]), 0.5 * v)


def test_arcee_fusion_keeps_the_outlying_changes_whole_and_drops_the_rest():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4, 8, generator=generator)
    other = base + 1e-3 * torch.randn(4, 8, generator=generator)
    other[1, 3] += 5.0  # one large change: a large |delta| in the row with a large KL
    out = run("arcee_fusion", base, [other])
    kept = out == other
    assert torch.all(kept | (out == base))  # each entry is the base's or the other model's
    assert kept[1, 3] and kept.sum() <= 16  # the outlier survives, most small changes do not
    zero = run("arcee_fusion", base, [base.clone()])
    assert torch.equal(zero, base)
