"""The CPU decode kernels (decode_kernels.cpp): the int8 product with activations quantised per block of 16
computes its stated formula, row by row whatever the batch, and the layers' compiled call gives the same
numbers as the Python layers it replaces."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import make_tiny_qwen2
from workers.generation.compact import CompactLlama, QuantLinear
from workers.generation.decode_kernel import decode_kernel, vnni_kernel

kernel = decode_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason="the decode kernels cannot be built here")
needs_vnni = pytest.mark.skipif(vnni_kernel() is None, reason="this CPU has no AVX-512 VNNI")


def block_quantised_product(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The formula of decode_kernels.cpp's head, in float64: y_mn = s_n sum_b d_mb sum_{k in b} q_mk W_nk."""
    m, k = x.shape
    padded = torch.zeros(m, -(-k // 32) * 32)  # weights' blocks of 32, activations' of 16
    padded[:, :k] = x.float()
    blocks = padded.view(m, -1, 16)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0  # float32, as the kernel
    inverse = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inverse).clamp(-127, 127)  # nearest even, as the CPU's conversion
    wide = torch.zeros(w.shape[0], padded.shape[1], dtype=torch.float64)
    wide[:, :k] = w.double()
    per_block = torch.einsum("mbk,nbk->mnb", q.double(), wide.view(w.shape[0], -1, 16))
    return (per_block * d.double().squeeze(-1)[:, None, :]).sum(-1) * s.double()


@needs_vnni
@pytest.mark.parametrize("k", [64, 96, 40, 576])
def test_int8_product_computes_its_block_quantised_formula(k):
    generator = torch.Generator().manual_seed(k)
    x = torch.randn(3, k, generator=generator).bfloat16()
    x[0, 5] = 40.0  # an outlier: only its own block's scale grows
    w = torch.randint(-127, 128, (50, k), generator=generator, dtype=torch.int8)
    s = (torch.rand(50, generator=generator) * 0.02).bfloat16()
    expected = block_quantised_product(x, w, s.float())
    got = kernel.int8_mm(x, w, s).double()
    # a bfloat16 rounding apart, or one quantisation step where x / d lands on a half (fast-math product)
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=2e-2)


@needs_vnni
def test_int8_product_of_a_row_does_not_depend_on_its_batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(11, 128, generator=generator).bfloat16()
    w = torch.randint(-127, 128, (70, 128), generator=generator, dtype=torch.int8)
    s = torch.rand(70, generator=generator).bfloat16()
    together = kernel.int8_mm(x, w, s)
    for row in range(11):
        assert torch.equal(together[row], kernel.int8_mm(x[row : row + 1], w, s)[0])


@needs_vnni
def test_int8_product_refuses_what_it_cannot_take():
    w = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError):
        kernel.int8_mm(torch.zeros(2, 64), w, torch.ones(4).bfloat16())  # float32 activations
    with pytest.raises(RuntimeError):
        kernel.int8_mm(torch.zeros(2, 32).bfloat16(), w, torch.ones(4).bfloat16())  # sizes differ


@needs_vnni
def test_an_int8_linear_on_this_cpu_quantises_its_activations_per_block():
    generator = torch.Generator().manual_seed(2)
    linear = QuantLinear(torch.randn(48, 64, generator=generator), None, "int8")
    x = torch.randn(2, 5, 64, generator=generator).bfloat16()
    expected = block_quantised_product(x.reshape(-1, 64), linear.weight, linear.scale.float())
    torch.testing.assert_close(linear(x).double().reshape(-1, 48), expected, rtol=2**-7, atol=1e-3)


def block_quantised(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: d_b q per block of 16."""
    m, k = x.shape
    blocks = x.float().view(m, -1, 16)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    inverse = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(blocks * inverse).clamp(-127, 127) * d).view(m, k)


@needs_vnni
@pytest.mark.parametrize("k", [64, 128, 192, 576])
def test_int4_product_computes_its_formula_with_exact_sums_for_the_minimums(k):
    generator = torch.Generator().manual_seed(k)
    weight = torch.randn(40, k, generator=generator)
    linear = QuantLinear(weight, None, "int4")
    assert linear.kernel is not None and linear.weight.shape == (40, k // 2)
    groups = weight.view(40, -1, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    codes = ((groups - low) / ((high - low) / 15)).round().clamp(0, 15)  # as quantised, in float32
    scale, zero = linear.scales_zeros.float()
    dequantized = linear.dequantized()
    # the packed codes read back as quantised: w = s_g (q - 8) + z_g
    torch.testing.assert_close(dequantized, ((codes - 8) * scale[..., None] + zero[..., None]).view(40, k))
    x = torch.randn(3, k, generator=generator).bfloat16()
    minimums = (zero - 8 * scale).repeat_interleave(32, 1)
    expected = block_quantised(x) @ (dequantized - minimums).T + x.float() @ minimums.T
    # float32 sums of large terms of both signs, then one bfloat16 rounding
    assert (linear(x).float() - expected).norm() / expected.norm() < 4e-3
    alone = [linear(x[row : row + 1]) for row in range(3)]
    assert torch.equal(linear(x), torch.cat(alone))


@needs_vnni
def test_int4_packing_refuses_codes_out_of_range_and_odd_sizes():
    with pytest.raises(RuntimeError):
        kernel.int4_pack(torch.full((2, 64), 16, dtype=torch.uint8))
    with pytest.raises(RuntimeError):
        kernel.int4_pack(torch.zeros(2, 96, dtype=torch.uint8))


def python_layers(compact: CompactLlama) -> CompactLlama:
    compact._stack, compact._stack_made = None, True  # as on a machine without the compiled call
    return compact


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("window", [None, 3])
def test_the_compiled_layers_give_the_python_layers_numbers(precision, window):
    torch.manual_seed(0)
    extra = {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 2} if window else {}
    model = make_tiny_qwen2(**extra)  # q/k/v biases; with a window, sliding layers beside full ones
    compiled, plain = CompactLlama(model, precision), python_layers(CompactLlama(model, precision))
    assert compiled._compiled_stack() is not None
    prompts = torch.randint(3, 128, (2, 7))
    pad = torch.ones(2, 7, dtype=torch.long)
    pad[1, :2] = 0  # the second row is left-padded
    runs = []
    for compact in (compiled, plain):
        cache = compact.new_cache(4, 2, 16)
        positions = (pad.cumsum(-1) - 1).clamp(min=0)
        logits = [compact.forward(prompts, positions, cache, 4, pad_mask=pad, last_only=False)]
        mask = pad
        for _ in range(4):  # decode steps through the cache, past the window
            token = logits[-1][:, -1:].argmax(-1) if logits[-1].dim() == 3 else logits[-1].argmax(-1, True)
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            logits.append(compact.forward(token, positions, cache, 4, pad_mask=mask))
        runs.append(logits)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_exits_use_the_compiled_layers_up_to_their_depth():
    torch.manual_seed(1)
    model = make_tiny_qwen2()
    compiled, plain = CompactLlama(model, "int8"), python_layers(CompactLlama(model, "int8"))
    ids = torch.randint(3, 128, (1, 6))
    for depth in (1, 3):
        a, b = (
            c.forward(ids, torch.arange(6)[None], c.new_cache(depth, 1, 8), depth) for c in (compiled, plain)
        )
        assert torch.equal(a, b)


def test_a_model_with_moe_layers_keeps_the_python_layers(monkeypatch):
    torch.manual_seed(2)
    compact = CompactLlama(make_tiny_qwen2(), "float32")
    monkeypatch.setattr(compact.layers[1], "moe", torch.nn.Identity())
    assert compact._compiled_stack() is None


def test_while_the_kernel_is_being_built_elsewhere_the_layers_call_is_asked_for_again(monkeypatch):
    import workers.generation.compact as compact_module

    torch.manual_seed(3)
    compact = CompactLlama(make_tiny_qwen2(), "float32")
    monkeypatch.setattr(compact_module, "decode_kernel", lambda: None)
    monkeypatch.setattr(compact_module, "decode_kernel_decided", lambda: False)  # another process builds it
    assert compact._compiled_stack() is None and not compact._stack_made
    monkeypatch.setattr(compact_module, "decode_kernel", decode_kernel)  # built since
    assert compact._compiled_stack() is not None and compact._stack_made
