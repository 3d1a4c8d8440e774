"""Variants served as base + delta through the compact engine's one seam: a mixed batch decodes each row as
its own full model would (greedy, float32, dense deltas), low-rank deltas exactly when the delta is low rank,
and the variant's own exit adapters (else its base's) at the exit."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.generation.test_compact_engine import random_adapters
from tests.tiny_models import make_tiny_llama
from workers.generation.deltas import (
    DenseDelta,
    Int8Delta,
    LowRankDelta,
    SparseDelta,
    VariantLayoutError,
    build_variant,
    compose,
)
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.generation.speculative import speculative_events


def perturbed(model, seed: int, scale: float = 0.05, rank: int | None = None):
    """A copy of `model` with every tensor moved by a random delta (of rank `rank` for matrices)."""
    generator = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for param in out.parameters():
            if rank and param.dim() == 2:
                a = torch.randn(param.shape[0], rank, generator=generator)
                b = torch.randn(rank, param.shape[1], generator=generator)
                param.add_(scale * (a @ b) / rank)
            else:
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return out


def deltas_of(base, full, form: str = "dense", rank: int | None = None) -> dict:
    base_state, full_state = base.state_dict(), full.state_dict()
    out: dict = {}
    for name, tensor in full_state.items():
        delta = tensor.float() - base_state[name].float()
        if delta.dim() == 1:
            out[name] = delta
        elif form == "dense":
            out[name] = DenseDelta(delta, torch.float32)
        elif form == "low_rank":
            u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
            root = s[:rank].sqrt()
            out[name] = LowRankDelta(root[:, None] * vh[:rank], u[:, :rank] * root, torch.float32)
        elif form == "sparse":
            out[name] = SparseDelta(delta) if "embed" not in name else DenseDelta(delta, torch.float32)
    return out


def greedy(prompt, depth, variant=None, new=10):
    return GenerationRequest(
        prompt_ids=prompt, depth=depth, max_new_tokens=new, ignore_eos=True, variant=variant
    )


@pytest.fixture(scope="module")
def family(tiny_model):
    return {"v1": perturbed(tiny_model, 1), "v2": perturbed(tiny_model, 2)}


def served(base, tokenizer, variants: dict, form="dense", rank=None, **engine_args):
    engine = EarlyExitEngine(base, tokenizer, device="cpu", **engine_args)
    for name, full in variants.items():
        engine.add_variant(build_variant(name, engine.compact, deltas_of(base, full, form, rank)))
    return engine


def test_a_mixed_batch_decodes_each_variant_as_its_full_model(tiny_model, tokenizer, family, prompts):
    engine = served(tiny_model, tokenizer, family)
    order = [None, "v1", "v2", "v1"]
    requests = [greedy(p, 4, v) for p, v in zip(prompts, order, strict=True)]
    finishes = engine.run(requests)
    assert {f.batch_size for f in finishes} == {4}  # one batch: the base's matmuls once for all rows
    for request, finish in zip(requests, finishes, strict=True):
        alone = tiny_model if request.variant is None else family[request.variant]
        expected = EarlyExitEngine(alone, tokenizer, device="cpu").run([greedy(request.prompt_ids, 4)])
        assert finish.token_ids == expected[0].token_ids, request.variant
    # the variants really differ from the base and from each other on these prompts
    assert len({tuple(f.token_ids) for f in finishes[1:3]}) == 2


def test_dynamic_depth_and_tied_heads_work_for_variants(tmp_path, tokenizer, prompts):
    base = make_tiny_llama(tmp_path / "tied", seed=4, tie_word_embeddings=True)
    variant = perturbed(base, 5)
    assert variant.lm_head.weight is variant.model.embed_tokens.weight
    engine = served(base, tokenizer, {"v": variant})
    for depth in (2, 4):
        got = engine.run([greedy(prompts[1], depth, "v")])[0].token_ids
        want = EarlyExitEngine(variant, tokenizer, device="cpu").run([greedy(prompts[1], depth)])[0].token_ids
        assert got == want


def test_low_rank_deltas_of_a_low_rank_fine_tune_give_its_tokens(tiny_model, tokenizer, prompts):
    variant = perturbed(tiny_model, 6, rank=2)
    engine = served(tiny_model, tokenizer, {"lr": variant}, form="low_rank", rank=2)
    held = engine.variants["lr"]
    assert all(isinstance(p.delta, LowRankDelta) for parts in held.linears.values() for p in parts)
    # one grouped product for all rows (the base's row with zero factors)
    got = engine.run([greedy(p, 4, "lr") for p in prompts[:3]] + [greedy(prompts[3], 4)])
    assert {f.batch_size for f in got} == {4}
    want = EarlyExitEngine(variant, tokenizer, device="cpu").run([greedy(p, 4) for p in prompts[:3]])
    base = EarlyExitEngine(tiny_model, tokenizer, device="cpu").run([greedy(prompts[3], 4)])
    assert [f.token_ids for f in got] == [f.token_ids for f in want + base]
    # every row the one variant: its factors once (2-D products), the same tokens
    alone = engine.run([greedy(p, 4, "lr") for p in prompts[:3]])
    assert [f.token_ids for f in alone] == [f.token_ids for f in want]


def test_sparse_and_int8_deltas_apply_their_products():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 8, generator=generator) * (torch.rand(12, 8, generator=generator) < 0.3)
    x = torch.randn(2, 3, 8, generator=generator)
    torch.testing.assert_close(SparseDelta(delta)(x), x @ delta.T)
    scale = (delta.abs().amax(1) / 127).clamp(min=1e-8)
    q = (delta / scale[:, None]).round()
    torch.testing.assert_close(Int8Delta(q, scale, torch.float32)(x), x @ (q * scale[:, None]).T)
    ids = torch.tensor([[3, 0]])
    torch.testing.assert_close(SparseDelta(delta).rows(ids), delta[ids])


def test_a_variant_uses_its_own_exit_adapters_else_its_bases(tiny_model, tokenizer, family, prompts):
    base_adapters = random_adapters(64, 4, [2], seed=3)
    own = random_adapters(64, 4, [2], seed=9)
    engine = served(tiny_model, tokenizer, {"v2": family["v2"]}, adapters=base_adapters)
    engine.add_variant(build_variant("v1", engine.compact, deltas_of(tiny_model, family["v1"]), own))
    requests = [greedy(prompts[0], 2, "v1"), greedy(prompts[0], 2, "v2"), greedy(prompts[0], 2)]
    got = engine.run(requests)
    assert all(f.exit_adapter for f in got)
    for finish, (full, adapters) in zip(
        got, [(family["v1"], own), (family["v2"], base_adapters), (tiny_model, base_adapters)], strict=True
    ):
        alone = EarlyExitEngine(full, tokenizer, device="cpu", adapters=adapters)
        assert finish.token_ids == alone.run([greedy(prompts[0], 2)])[0].token_ids


def test_speculative_decoding_of_a_variant_gives_its_greedy_tokens(tiny_model, tokenizer, family, prompts):
    engine = served(tiny_model, tokenizer, family)
    request = greedy(prompts[2], 4, "v1", new=12)
    events = list(speculative_events(engine, request, draft_depth=2, num_draft_tokens=3))
    want = EarlyExitEngine(family["v1"], tokenizer, device="cpu").run([greedy(prompts[2], 4, new=12)])
    assert events[-1].token_ids == want[0].token_ids


def test_deltas_naming_modules_or_shapes_the_base_lacks_are_refused(tiny_model, tokenizer):
    engine = EarlyExitEngine(tiny_model, tokenizer, device="cpu")
    with pytest.raises(VariantLayoutError, match="no module"):
        build_variant("x", engine.compact, {"model.layers.9.mlp.down_proj.weight": torch.zeros(1)})
    with pytest.raises(VariantLayoutError, match="no module"):
        build_variant("x", engine.compact, {"model.layers.0.self_attn.rotary.weight": torch.zeros(1)})
    with pytest.raises(VariantLayoutError, match="delta is"):
        wrong = DenseDelta(torch.zeros(64, 32), torch.float32)
        build_variant("x", engine.compact, {"model.layers.0.self_attn.o_proj.weight": wrong})
    with pytest.raises(ValueError, match="not loaded"):
        engine.run([greedy([5, 6], 2, "nobody")])


def test_a_composition_of_variants_decodes_as_their_merged_model(tiny_model, tokenizer, family, prompts):
    engine = served(tiny_model, tokenizer, family)
    parts = [(engine.variants["v1"], 0.3), (engine.variants["v2"], 0.7)]
    engine.add_variant(compose("mix", engine.compact, parts))
    merged = copy.deepcopy(tiny_model)
    base_state, one, two = tiny_model.state_dict(), family["v1"].state_dict(), family["v2"].state_dict()
    with torch.no_grad():
        for name, param in merged.named_parameters():
            param.copy_(
                base_state[name] + 0.3 * (one[name] - base_state[name]) + 0.7 * (two[name] - base_state[name])
            )
    got = engine.run(
        [greedy(prompts[1], 4, "mix"), greedy(prompts[1], 4, "v1"), greedy(prompts[2], 4, "mix")]
    )
    want = EarlyExitEngine(merged, tokenizer, device="cpu").run(
        [greedy(prompts[1], 4), greedy(prompts[2], 4)]
    )
    assert [got[0].token_ids, got[2].token_ids] == [w.token_ids for w in want]
    assert got[0].token_ids != got[1].token_ids
