"""The compact engine: weight precisions, exit adapters at the exit, and KV caches reused across requests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

from workers.early_exit.adapters import Affine, ExitAdapters
from workers.early_exit.forward import exit_logits, residual_at_exits
from workers.generation.compact import QuantLinear
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.generation.reference import greedy_reference


def greedy(prompt: list[int], depth: int, new: int = 8, **extra) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, depth=depth, max_new_tokens=new, ignore_eos=True, **extra)


def random_adapters(hidden: int, layers: int, depths: list[int], seed: int = 3) -> ExitAdapters:
    generator = torch.Generator().manual_seed(seed)
    maps = {
        k: Affine(
            torch.eye(hidden) + 0.2 * torch.randn(hidden, hidden, generator=generator) / hidden**0.5,
            0.1 * torch.randn(hidden, generator=generator),
            scale=0.6 + 0.1 * k,  # a scale other than 1, so the engine must apply it like the reference
        )
        for k in depths
    }
    return ExitAdapters(maps, layers, hidden)


def test_int8_linear_is_per_channel_symmetric_quantisation():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator)
    x = torch.randn(3, 64, generator=generator)
    linear = QuantLinear(weight, None, "int8")
    assert linear.weight.dtype == torch.int8 and int(linear.weight.abs().max()) == 127
    dequantized = linear.dequantized().float()
    step = weight.abs().amax(1, keepdim=True) / 127  # one int8 step per output channel
    scale_rounding = weight.abs() * 2**-8  # the scale is kept in bfloat16, the activation dtype
    assert ((dequantized - weight).abs() <= step / 2 + scale_rounding + 1e-6).all()
    expected = F.linear(x.bfloat16().float(), dequantized)
    # on a CPU with VNNI the activations are quantised to int8 per block of 32 too (test_decode_kernels)
    assert (linear(x.bfloat16()).float() - expected).norm() / expected.norm() < 1e-2
    assert linear.bytes == 48 * 64 + 48 * 2


def test_int4_linear_is_groupwise_asymmetric_quantisation():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 64, generator=generator)
    x = torch.randn(3, 64, generator=generator)
    linear = QuantLinear(weight, None, "int4")
    groups = weight.reshape(48, 2, 32)
    step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    error = (linear.dequantized().reshape(48, 2, 32) - groups).abs()
    assert (error <= step / 2 + groups.abs() * 2**-7 + 1e-3).all()
    expected = F.linear(x.bfloat16().float(), linear.dequantized())
    # on a CPU with VNNI the activations are quantised to int8 per block of 32 too (test_decode_kernels)
    assert (linear(x.bfloat16()).float() - expected).norm() / expected.norm() < 2e-2
    assert linear.bytes == 48 * 64 // 2 + 2 * 48 * 2 * 2


@pytest.mark.parametrize("precision, bound", [("bfloat16", 0.05), ("int8", 0.05), ("int4", 0.25)])
def test_low_precision_engine_stays_close_to_float32_logits(tiny_model, tokenizer, prompts, precision, bound):
    engine = EarlyExitEngine(tiny_model, tokenizer, device="cpu", precision=precision)
    compact, reference = engine.compact, exit_logits(tiny_model, torch.tensor([prompts[3]]), 4)[0]
    ids = torch.tensor([prompts[3]])
    logits = compact.forward(
        ids, torch.arange(ids.shape[1])[None], compact.new_cache(4, 1, 32), 4, last_only=False
    )
    error = (logits[0] - reference).norm() / reference.norm()
    assert error < bound, f"{precision}: relative logit error {error:.3f}"  # random weights: int4 is coarse
    assert compact.weight_bytes(4) < EarlyExitEngine(
        tiny_model, tokenizer, device="cpu"
    ).compact.weight_bytes(4)


def test_adapted_exit_logits_equal_the_uncached_reference(tiny_model, tokenizer, prompts):
    hidden = tiny_model.config.hidden_size
    adapters = random_adapters(hidden, 4, [1, 2, 3])
    engine = EarlyExitEngine(tiny_model, tokenizer, device="cpu", adapters=adapters)
    compact = engine.compact
    for depth in (2, 3):
        ids = torch.tensor([prompts[1]])
        ours = compact.forward(
            ids, torch.arange(ids.shape[1])[None], compact.new_cache(depth, 1, 32), depth, last_only=False
        )
        theirs = exit_logits(tiny_model, ids, depth, adapters=adapters)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        plain = exit_logits(tiny_model, ids, depth)
        assert (ours - plain).abs().max() > 1e-2  # the adapter really changed the exit


def test_adapters_change_exits_but_never_full_depth(tiny_model, tokenizer, prompts):
    adapters = random_adapters(tiny_model.config.hidden_size, 4, [1, 2, 3])
    adapted = EarlyExitEngine(tiny_model, tokenizer, device="cpu", adapters=adapters)
    plain = EarlyExitEngine(tiny_model, tokenizer, device="cpu")
    for prompt in prompts:
        assert adapted.run([greedy(prompt, 4)])[0].token_ids == plain.run([greedy(prompt, 4)])[0].token_ids
        off = adapted.run([greedy(prompt, 2, exit_adapter=False)])[0].token_ids
        assert off == greedy_reference(tiny_model, prompt, 2, 8)
    shallow = [
        adapted.run([greedy(p, 1)])[0].token_ids != plain.run([greedy(p, 1)])[0].token_ids for p in prompts
    ]
    assert any(shallow)


def test_adapter_on_and_off_requests_at_one_depth_run_in_separate_batches(tiny_model, tokenizer, prompts):
    adapters = random_adapters(tiny_model.config.hidden_size, 4, [2])
    engine = EarlyExitEngine(tiny_model, tokenizer, device="cpu", adapters=adapters)
    results = engine.run(
        [greedy(prompts[0], 2), greedy(prompts[1], 2, exit_adapter=False), greedy(prompts[2], 2)]
    )
    assert [r.batch_size for r in results] == [2, 1, 2]
    assert results[1].token_ids == greedy_reference(tiny_model, prompts[1], 2, 8)


def test_kv_cache_is_reused_across_requests_and_results_stay_exact(engine, tiny_model, prompts):
    first = engine.run([greedy(prompts[0], 3)])[0]
    kept = engine._free_caches[3]
    second = engine.run([greedy(prompts[2], 3)])[0]
    assert engine._free_caches[3] is kept
    assert first.token_ids == greedy_reference(tiny_model, prompts[0], 3, 8)
    assert second.token_ids == greedy_reference(tiny_model, prompts[2], 3, 8)


def test_residuals_at_exits_match_the_uncached_reference(engine, tiny_model, prompts):
    ids = torch.tensor([prompts[3]])
    ours = engine.compact.residuals(ids, [1, 3, 4])
    theirs = residual_at_exits(tiny_model, ids, [1, 3, 4])
    assert sorted(ours) == [1, 3, 4]
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-5)


def test_sparse_moe_layers_give_the_uncached_reference_logits_at_every_depth(tokenizer, prompts):
    """A Mixtral's MoE MLPs run as transformers' own blocks inside the compact step."""
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=3,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    model = MixtralForCausalLM(config).eval()
    compact = EarlyExitEngine(model, tokenizer, device="cpu").compact
    ids = torch.tensor([prompts[3]])
    for depth in (1, 3):
        ours = compact.forward(
            ids, torch.arange(ids.shape[1])[None], compact.new_cache(depth, 1, 32), depth, last_only=False
        )
        torch.testing.assert_close(ours, exit_logits(model, ids, depth), rtol=1e-4, atol=1e-4)
    assert compact.weight_bytes(3) > compact.weight_bytes(1)
