"""A serving engine built from a checkpoint read one decoder layer at a time decodes exactly the tokens of
one built from the whole loaded model (LLaMA with and without a tied head, Qwen2 with its biases; float32,
int8, int4), holds no float layer afterwards, and checkpoints whose tensors are not their modules' are not
streamed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

from tests.tiny_models import character_tokenizer, make_tiny_llama, make_tiny_qwen2
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.generation.streamed_load import streamed_model
from workers.inference.worker import load_engine


def _tokens(engine: EarlyExitEngine) -> list[list[int]]:
    requests = [
        GenerationRequest(prompt_ids=[5, 9, 11, 20], max_new_tokens=6, depth=engine.num_layers),
        GenerationRequest(prompt_ids=[7, 3, 30], max_new_tokens=6, depth=1),
    ]
    return [result.token_ids for result in engine.run(requests)]


def _checkpoint(tmp_path, kind: str):
    path = tmp_path / kind
    if kind == "qwen2":
        make_tiny_qwen2(seed=2).save_pretrained(path)
    else:
        make_tiny_llama(path, seed=2, tie_word_embeddings=kind == "tied")
    character_tokenizer().save_pretrained(path)
    GenerationConfig(eos_token_id=[2, 17]).save_pretrained(path)  # EOS ids beyond the config's
    return path


@pytest.mark.parametrize("kind", ["llama", "tied", "qwen2"])
@pytest.mark.parametrize("precision", ["float32", "int8", "int4"])
def test_a_streamed_engine_decodes_the_tokens_of_a_whole_loaded_one(tmp_path, kind, precision):
    path = _checkpoint(tmp_path, kind)
    whole = load_engine(path, torch.device("cpu"), precision=precision)
    streamed = load_engine(path, torch.device("cpu"), precision=precision, serve_only=True)
    assert streamed.source_released and not whole.source_released
    assert _tokens(streamed) == _tokens(whole)
    assert streamed.eos_token_ids == whole.eos_token_ids and 17 in streamed.eos_token_ids
    layers = streamed.model.model.layers
    assert all(p.numel() == 0 for p in layers[0].mlp.parameters()) or precision == "float32"
    assert layers[0].self_attn.q_proj.weight.numel() == 0  # fused into the compact model's qkv


def test_checkpoints_whose_tensors_are_not_their_modules_are_not_streamed(tmp_path):
    path = _checkpoint(tmp_path, "llama")
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.self_attn.q_proj.weight"
    save_file({**tensors, name: tensors[name][:, :8].contiguous()}, weights)
    assert streamed_model(path, torch.float32) is None  # a shape that is not its module's
    save_file({n: t for n, t in tensors.items() if n != name}, weights)
    assert streamed_model(path, torch.float32) is None  # a module without its tensor
