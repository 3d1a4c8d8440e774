"""PEFT LoRA adapters served over their base without merging: the tokens equal those of PEFT's own merged
model (greedy, float32, in a batch with the base), and adapters that do not fit are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from tests.tiny_models import character_tokenizer, make_tiny_llama
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.lora.adapter_delta import AdapterError, adapter_to_delta
from workers.variants_delta import load_variant


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "base"
    return path, make_tiny_llama(path, seed=0)


def peft_adapter(model, out, **config) -> torch.nn.Module:
    """A PEFT LoRA adapter with random (non-zero) factors saved to `out`; PEFT's merged model."""
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**{**options, **config}))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out)
    return peft_model.merge_and_unload().eval()


def greedy(prompt, variant=None):
    return GenerationRequest(prompt_ids=prompt, depth=4, max_new_tokens=10, ignore_eos=True, variant=variant)


@pytest.mark.parametrize(
    "config",
    [{}, {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}}, {"use_rslora": True}],
    ids=["plain", "patterns", "rslora"],
)
def test_an_adapter_served_unmerged_gives_the_tokens_of_pefts_merged_model(base, tmp_path, config):
    base_dir, model = base
    merged = peft_adapter(model, tmp_path / "adapter", **config)
    meta = adapter_to_delta(tmp_path / "adapter", base_dir, tmp_path / "served", base_id="base")
    assert {t["form"] for t in meta["tensors"].values()} == {"low_rank"}
    tokenizer = character_tokenizer()
    engine = EarlyExitEngine(model, tokenizer, device="cpu")
    engine.add_variant(load_variant(tmp_path / "served", "ad", engine.compact))
    prompts = [[5, 9, 30, 7], [40, 41, 42, 43, 44]]
    got = engine.run([greedy(prompts[0], "ad"), greedy(prompts[1]), greedy(prompts[1], "ad")])
    want = EarlyExitEngine(merged, tokenizer, device="cpu").run([greedy(p) for p in prompts])
    plain = EarlyExitEngine(model, tokenizer, device="cpu").run([greedy(prompts[1])])
    assert [f.token_ids for f in got] == [want[0].token_ids, plain[0].token_ids, want[1].token_ids]
    assert want[1].token_ids != plain[0].token_ids


def test_adapters_that_do_not_fit_their_base_are_refused_with_nothing_written(base, tmp_path):
    base_dir, model = base
    peft_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    renamed = {
        k.replace("q_proj", "x_proj") if k.startswith(key.rsplit(".lora_A", 1)[0]) else k: v
        for k, v in tensors.items()
    }
    save_file(renamed, weights)
    with pytest.raises(AdapterError, match="does not have"):
        adapter_to_delta(tmp_path / "a", base_dir, tmp_path / "out", base_id="base")
    assert not (tmp_path / "out").exists()
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("inf")
    save_file(tensors, weights)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        adapter_to_delta(tmp_path / "a", base_dir, tmp_path / "out", base_id="base")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        adapter_to_delta(tmp_path / "a", base_dir, tmp_path / "out", base_id="base")
    config_path.write_text(json.dumps({**config, "r": 8}))  # factors of rank 4 under a config saying 8
    save_file(load_file(weights) | {key: torch.zeros(4, 64)}, weights)
    with pytest.raises(AdapterError, match="do not fit"):
        adapter_to_delta(tmp_path / "a", base_dir, tmp_path / "out", base_id="base")
    assert not (tmp_path / "out").exists()


def test_an_extracted_adapter_of_a_tied_model_serves_the_fine_tunes_tokens(tmp_path):
    from transformers import AutoModelForCausalLM

    from workers.lora.extract import extract_lora
    from workers.variants import make_variant

    base_model = make_tiny_llama(tmp_path / "base", seed=7, tie_word_embeddings=True)
    (tmp_path / "tune").mkdir()
    make_variant(tmp_path / "base", tmp_path / "tune", seed=3, scale=0.05)
    (tmp_path / "lora").mkdir()
    extract_lora(tmp_path / "tune", tmp_path / "base", tmp_path / "lora", base_name="base", max_rank=64)
    adapter_to_delta(tmp_path / "lora", tmp_path / "base", tmp_path / "lora", base_id="base")
    tokenizer = character_tokenizer()
    engine = EarlyExitEngine(base_model, tokenizer, device="cpu")
    engine.add_variant(load_variant(tmp_path / "lora", "lora", engine.compact))
    tune = AutoModelForCausalLM.from_pretrained(tmp_path / "tune", dtype=torch.float32).eval()
    got = engine.run([greedy([5, 9, 30, 7], "lora")])[0].token_ids
    assert got == EarlyExitEngine(tune, tokenizer, device="cpu").run([greedy([5, 9, 30, 7])])[0].token_ids
