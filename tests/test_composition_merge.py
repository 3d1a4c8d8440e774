"""Per-request TIES and DARE merges of variants of one base (workers.composition_merge): the base plus the
computed merge delta decodes the tokens of the model a merge job with the same recipe (and seed) writes,
greedy, float32, on a tiny model; whether a variant is read from its own weights or materialised from its
stored delta; a recipe gets one cache key however its JSON is ordered."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_models import character_tokenizer, make_tiny_llama
from workers.composition import CompositionError, parse, terms
from workers.composition_merge import computed_variant, merged_deltas
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.merge.config import MergeConfig
from workers.merge.executor import merge_models
from workers.variants import make_variant
from workers.variants_delta import DELTA_META, DELTA_WEIGHTS, compress_variant

BASES = {"base": None, "v1": "base", "v2": "base"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("computed")
    make_tiny_llama(root / "base", seed=0)
    for seed, name in ((1, "v1"), (2, "v2")):
        (root / name).mkdir()
        make_variant(root / "base", root / name, seed=seed, scale=0.05)
        compress_variant(root / "base", root / name, root / name, base_id="base", error_budget=0.0)
    # v2 also as a delta only (config + delta files): read as base + its materialised delta
    (root / "v2-delta").mkdir()
    for file in ("config.json", DELTA_WEIGHTS, DELTA_META):
        shutil.copyfile(root / "v2" / file, root / "v2-delta" / file)
    return root


def recipe(method: str, **parameters) -> dict:
    return {
        "merge_method": method,
        "base_model": "base",
        "models": [
            {"model": "v1", "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": "v2", "parameters": {"weight": 0.4, "density": 0.6}},
        ],
        "parameters": parameters,
        "seed": 7,
    }


def greedy(engine: EarlyExitEngine, variant: str | None = None) -> list[list[int]]:
    prompts = [[5, 9, 30, 7], [40, 41, 42, 43, 44, 45, 46], [3, 3, 8]]
    requests = [
        GenerationRequest(prompt_ids=p, depth=4, max_new_tokens=12, ignore_eos=True, variant=variant)
        for p in prompts
    ]
    return [f.token_ids for f in engine.run(requests)]


def load_float32(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "method, parameters",
    [("ties", {"normalize": True}), ("dare_linear", {}), ("dare_ties", {"rescale": True})],
)
def test_a_computed_merge_decodes_the_tokens_of_the_merge_jobs_model(store, tmp_path, method, parameters):
    _, computed = terms(parse(recipe(method, **parameters)), BASES)
    paths = {name: store / name for name in ("base", "v1", "v2")}
    (tmp_path / "merged").mkdir()
    merge_models(MergeConfig.model_validate(computed.config()), paths, tmp_path / "merged")
    tokenizer = character_tokenizer()
    engine = EarlyExitEngine(load_float32(store / "base"), tokenizer, device="cpu")
    engine.add_variant(computed_variant(computed, store / "base", paths, engine.compact, "m"))
    merged = EarlyExitEngine(load_float32(tmp_path / "merged"), tokenizer, device="cpu")
    want = greedy(merged)
    assert greedy(engine, "m") == want
    assert want != greedy(engine)  # the merge really moves the base
    # a variant stored only as its delta is read as the merge job would materialise it: the same deltas
    from_delta = merged_deltas(computed, store / "base", {"v1": store / "v1", "v2": store / "v2-delta"})
    from_weights = merged_deltas(computed, store / "base", paths)
    assert from_delta.keys() == from_weights.keys()
    for name, delta in from_weights.items():
        torch.testing.assert_close(from_delta[name], delta, rtol=0, atol=1e-6)


def test_dare_follows_the_recipes_seed_and_the_key_is_canonical(store):
    one = terms(parse(recipe("dare_linear")), BASES)[1]
    reordered = [
        {"model": m["model"], "parameters": dict(reversed(m["parameters"].items()))}
        for m in recipe("dare_linear")["models"]
    ]
    again = terms(parse({"seed": 7, **recipe("dare_linear"), "models": reordered}), BASES)[1]
    other = terms(parse({**recipe("dare_linear"), "seed": 8}), BASES)[1]
    assert one.key() == again.key() != other.key()
    paths = {name: store / name for name in ("v1", "v2")}
    a, b = merged_deltas(one, store / "base", paths), merged_deltas(other, store / "base", paths)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(a[name], b[name])  # another seed drops other entries


@pytest.mark.parametrize(
    "body, message",
    [
        ({**recipe("ties"), "base_model": None}, "needs base_model"),
        (
            {**recipe("ties"), "models": [{"model": "v1", "parameters": {"weight": 1, "density": 1.5}}]},
            "density",
        ),
        ({**recipe("dare_ties"), "models": [{"model": "v1", "parameters": {"density": 0.5}}]}, "weight"),
        ({**recipe("ties"), "parameters": {"int8_mask": True, "k": 3}}, "does not take"),
        ({**recipe("ties"), "seed": -1}, "merge.seed"),
    ],
)
def test_ties_and_dare_recipes_with_bad_parameters_are_refused(body, message):
    with pytest.raises(CompositionError, match=message):
        terms(parse(body), BASES)
