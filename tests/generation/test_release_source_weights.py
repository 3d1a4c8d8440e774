"""An engine that serves can free its source model's weights: the compact model keeps its own quantised or
fused copies, so the tokens (plain, at an exit, and for a variant added afterwards) stay the same, while
the memory of the float32 matrices it no longer reads is returned."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import character_tokenizer, make_tiny_llama
from workers.generation.deltas import LowRankDelta, build_variant
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.generation.profiler import profile_model


def _engine(tmp_path, precision: str) -> EarlyExitEngine:
    model = make_tiny_llama(tmp_path / precision, seed=4)
    return EarlyExitEngine(model, character_tokenizer(), device="cpu", precision=precision)


def _variant(engine: EarlyExitEngine, shapes: dict[str, tuple[int, int]]):
    generator = torch.Generator().manual_seed(9)
    deltas = {
        name: LowRankDelta(
            torch.randn(2, n, generator=generator) * 0.2,
            torch.randn(m, 2, generator=generator),
            torch.float32,
        )
        for name, (m, n) in shapes.items()
    }
    return build_variant("v", engine.compact, deltas)


def _tokens(engine: EarlyExitEngine, variant: str | None = None) -> list[list[int]]:
    requests = [
        GenerationRequest(
            prompt_ids=[5, 9, 11, 20], max_new_tokens=6, depth=engine.num_layers, variant=variant
        ),
        GenerationRequest(prompt_ids=[7, 3, 30], max_new_tokens=6, depth=1, variant=variant),
    ]
    return [result.token_ids for result in engine.run(requests)]


@pytest.mark.parametrize("precision", ["float32", "int8", "int4"])
def test_released_engines_decode_the_same_tokens_and_free_the_dead_matrices(tmp_path, precision):
    kept, released = _engine(tmp_path / "a", precision), _engine(tmp_path / "b", precision)
    layers = released.model.model.layers
    shapes = {
        f"model.layers.{i}.self_attn.q_proj.weight": tuple(layer.self_attn.q_proj.weight.shape)
        for i, layer in enumerate(layers)
    }
    matrices = sum(
        p.numel() * p.element_size() for layer in layers for n, p in layer.named_parameters() if p.dim() == 2
    )
    freed = released.release_source_weights()
    assert released.source_released and not kept.source_released
    if precision == "float32":  # q, k, v and gate, up are fused into new tensors; o and down are shared
        assert 0 < freed < matrices
    else:
        assert freed >= matrices  # every layer matrix is held quantised
    assert layers[0].self_attn.q_proj.weight.numel() == 0
    assert released.model.model.embed_tokens.weight.numel() > 0  # the compact model computes with it
    assert _tokens(released) == _tokens(kept)
    for engine in (kept, released):
        engine.add_variant(_variant(engine, shapes))
    assert _tokens(released, "v") == _tokens(kept, "v") != _tokens(kept)


def test_profiling_refuses_an_engine_without_its_source_model(tmp_path):
    engine = _engine(tmp_path, "int8")
    engine.release_source_weights()
    with pytest.raises(ValueError, match="kept its source model"):
        profile_model(engine)
