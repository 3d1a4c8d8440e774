"""first_non_finite finds a NaN or an inf anywhere in a model directory's floating tensors."""

import math

import pytest
import torch
from safetensors.torch import save_file

from workers.tensors.finite import CHUNK, first_non_finite


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_non_finite_names_the_tensor_with_a_nan_or_an_inf(tmp_path, bad, dtype):
    big = torch.randn(CHUNK + 7).to(dtype)  # the bad entry sits in the second chunk
    if bad is not None:
        big[CHUNK + 3] = bad
    tensors = {"a.weight": torch.randn(4, 4).to(dtype), "b.weight": big, "c.ids": torch.arange(3)}
    save_file(tensors, tmp_path / "model.safetensors")
    assert first_non_finite(tmp_path) == (None if bad is None else "b.weight")
