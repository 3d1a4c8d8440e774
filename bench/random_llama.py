"""Random LLaMA models written tensor by tensor (never a whole model in memory), for benchmarks.

The default model's shape is SmolLM2-135M: 30 decoder layers of width 576, a 49152-token tied
embedding. `scaled_config(f)` keeps every tensor shape and multiplies the parameter count by about f
with more decoder layers, so the largest tensor (the embedding) and hence a streaming merge's peak
memory stay the same while the work grows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from workers.tensors.safetensors_io import PlannedTensor, ShardedWriter

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)
TINY = dict(  # quick mode: the embedding (4096 x 64) is still large enough for the bracketed selection
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
    tie_word_embeddings=False,
)


def shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a LlamaForCausalLM with this config, in Hugging Face order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    out["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def num_parameters(config: dict) -> int:
    return sum(math.prod(s) for s in shapes(config).values())


def scaled_config(factor: float, config: dict = SMOLLM2_135M) -> dict:
    """`config` with as many more decoder layers as make about `factor` times the parameters."""
    per_layer = num_parameters({**config, "num_hidden_layers": 1}) - num_parameters(
        {**config, "num_hidden_layers": 0}
    )
    fixed = num_parameters({**config, "num_hidden_layers": 0})
    layers = round((factor * num_parameters(config) - fixed) / per_layer)
    return {**config, "num_hidden_layers": max(1, layers)}


def hf_config(config: dict) -> dict:
    """config.json of a LlamaForCausalLM (what transformers and mergekit read)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "head_dim": config["hidden_size"] // config["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
        **config,
    }


def write_random_llama(out_dir: Path, config: dict, seed: int = 0) -> None:
    """A random LLaMA (weights N(0, 0.02^2), norms 1 + N(0, 0.1^2)) in float32, one tensor at a time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = shapes(config)
    writer = ShardedWriter(out_dir, [PlannedTensor(n, torch.float32, s) for n, s in layout.items()])
    generator = torch.Generator().manual_seed(seed)
    for name, shape in layout.items():
        weights = torch.randn(shape, generator=generator)
        weights = weights.mul_(0.1).add_(1) if name.endswith("norm.weight") else weights.mul_(0.02)
        writer.write(name, weights)
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(hf_config(config), indent=2))


def write_character_tokenizer(out_dir: Path) -> None:
    """A one-token-per-character tokenizer (printable ASCII, BOS <s>, EOS </s>), so quick-mode models can
    tokenize prompts (the MoE row's cheap_embed gate)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *map(chr, range(32, 127))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(out_dir)
