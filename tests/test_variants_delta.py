"""Variants stored as base + compressed delta: the form chosen per tensor meets the error budget at the fewest
bytes, the stored delta serves the variant's tokens (exactly when dense) and materialises back to it; a
variant that does not fit its base is refused with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.tiny_models import character_tokenizer, make_tiny_llama
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.variants import make_variant as write_variant
from workers.variants_delta import (
    DELTA_META,
    DELTA_WEIGHTS,
    DeltaError,
    choose,
    compress_variant,
    delta_base,
    load_variant,
    materialise,
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("delta") / "base"
    make_tiny_llama(path, seed=0)
    return path


def make_variant(base, out, **options) -> None:
    out.mkdir(parents=True)
    write_variant(base, out, **options)


def load_float32(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy_tokens(engine: EarlyExitEngine, variant: str | None = None) -> list[list[int]]:
    prompts = [[5, 9, 30, 7], [40, 41, 42, 43, 44, 45, 46]]
    requests = [
        GenerationRequest(prompt_ids=p, depth=4, max_new_tokens=12, ignore_eos=True, variant=variant)
        for p in prompts
    ]
    return [f.token_ids for f in engine.run(requests)]


def test_a_dense_budget_of_zero_stores_the_delta_exactly_and_serves_the_variants_tokens(base_dir, tmp_path):
    make_variant(base_dir, tmp_path / "v", seed=1, scale=0.05)
    report = compress_variant(base_dir, tmp_path / "v", tmp_path / "v", base_id="base", error_budget=0.0)
    assert {c.form for c in report.tensors.values()} == {"dense"}
    assert delta_base(tmp_path / "v") == "base"
    tokenizer = character_tokenizer()
    engine = EarlyExitEngine(load_float32(base_dir), tokenizer, device="cpu")
    engine.add_variant(load_variant(tmp_path / "v", "v", engine.compact))
    alone = EarlyExitEngine(load_float32(tmp_path / "v"), tokenizer, device="cpu")
    assert greedy_tokens(engine, "v") == greedy_tokens(alone)
    assert greedy_tokens(engine, "v") != greedy_tokens(engine)


def test_a_low_rank_fine_tune_is_stored_at_its_rank_and_materialises_back(base_dir, tmp_path):
    make_variant(base_dir, tmp_path / "v", seed=2, scale=0.05, rank=2)
    report = compress_variant(base_dir, tmp_path / "v", tmp_path / "d", base_id="base", error_budget=0.01)
    matrices = {n: c for n, c in report.tensors.items() if "norm" not in n}
    assert {c.form for c in matrices.values()} == {"low_rank"}
    assert {c.rank for c in matrices.values()} == {2}
    assert max(c.relative_error for c in report.tensors.values()) <= 0.01
    assert report.summary()["bytes_vs_base"] < 0.25
    meta = json.loads((tmp_path / "d" / DELTA_META).read_text())
    assert meta["tensors"]["model.layers.0.mlp.up_proj.weight"]["form"] == "low_rank"
    materialise(base_dir, tmp_path / "d", tmp_path / "full")
    want = load_file(next((tmp_path / "v").glob("*.safetensors")))
    got = load_file(next((tmp_path / "full").glob("*.safetensors")))
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5)


def test_each_form_is_picked_where_it_is_cheapest_within_the_budget():
    generator = torch.Generator().manual_seed(0)
    sparse = torch.randn(64, 64, generator=generator) * (torch.rand(64, 64, generator=generator) < 0.02)
    choice, parts = choose(sparse, 0.01, 16, ("low_rank", "sparse", "int8", "dense"), torch.float32)
    assert (
        choice.form == "sparse" and choice.relative_error <= 0.01 and set(parts) == {"crow", "col", "values"}
    )
    noise = torch.randn(64, 64, generator=generator)
    choice, _ = choose(noise, 0.05, 16, ("low_rank", "sparse", "int8", "dense"), torch.float32)
    assert choice.form == "int8" and choice.relative_error <= 0.05
    choice, _ = choose(noise, 0.0, 16, ("low_rank", "sparse", "int8", "dense"), torch.float32)
    assert choice.form == "dense" and choice.relative_error == 0.0


def test_a_variant_that_does_not_fit_its_base_is_refused_with_nothing_written(base_dir, tmp_path):
    other = tmp_path / "other"
    make_tiny_llama(other, seed=3, intermediate_size=96)
    with pytest.raises(DeltaError, match="does not match the base"):
        compress_variant(base_dir, other, tmp_path / "out", base_id="base")
    assert not (tmp_path / "out" / DELTA_WEIGHTS).exists() and not (tmp_path / "out" / DELTA_META).exists()
    make_variant(base_dir, tmp_path / "nan", seed=4)
    shard = next((tmp_path / "nan").glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(DeltaError, match="NaN"):
        compress_variant(base_dir, tmp_path / "nan", tmp_path / "out2", base_id="base")
    assert not (tmp_path / "out2" / DELTA_WEIGHTS).exists()
