"""Router weights from prompts, as mergekit-moe 0.1.5 sets them.

For expert e with positive prompts P_e and negative prompts N_e, and layer l:

    g_{l,e} = (s_l(P_e) - s_l(N_e)) / max(||s_l(P_e) - s_l(N_e)||_2, 1e-8)      (s_l(N_e) = 0 if no N_e)

where s_l(prompts) is the mean over the prompts of
  - hidden / hidden_last: the residual stream entering layer l at the last token (base model in bfloat16,
    prompts prefixed with the BOS text and left-padded with BOS, as mergekit does),
  - hidden_avg: that residual stream averaged over the padded sequence,
  - cheap_embed: the token embeddings summed over all prompts' real tokens and L2-normalised, the same
    vector for every layer.
The router of layer l is the matrix [g_{l,1}; ...; g_{l,E}] (one row per expert, router logits = g h).
`random` draws N(0, 1) rows and `uniform_random` U(-1/sqrt(H), 1/sqrt(H)) rows (torch.nn.Linear's init),
both from `seed`. Arithmetic order and dtypes follow mergekit, so the rows match it bit for bit on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase

from workers.early_exit.forward import residual_at_exits
from workers.moe.config import Expert, MoeConfig
from workers.tensors.safetensors_io import TensorReader

EMBED = "model.embed_tokens.weight"


class RouterError(ValueError):
    """Router weights that cannot be computed from this base model and these prompts."""


def prompt_tokenizer(base_dir: Path) -> PreTrainedTokenizerBase:
    """The base's tokenizer, left-padding with BOS (EOS when there is no BOS), as mergekit-moe uses it."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as e:
        raise RouterError("the base model has no loadable tokenizer; prompt-based gate modes need one") from e
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise RouterError("the base model's tokenizer has neither a BOS nor an EOS token to pad with")
    return tokenizer


def tokenize(prompts: list[str], tokenizer: PreTrainedTokenizerBase) -> BatchEncoding:
    return tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def hidden_summary(
    model: torch.nn.Module, num_layers: int, average: bool
) -> Callable[[BatchEncoding], torch.Tensor]:
    """s_l for l = 0..L-1: the residual stream entering each layer, at the last token or averaged over the
    sequence, then averaged over the prompts. Shape (L, H), in the model's dtype."""

    def summarise(tokens: BatchEncoding) -> torch.Tensor:
        device = next(model.parameters()).device
        with torch.no_grad():
            states = residual_at_exits(
                model,
                tokens["input_ids"].to(device),
                range(num_layers),
                tokens["attention_mask"].to(device),
            )
        stacked = torch.stack([states[k] for k in range(num_layers)])  # (L, B, S, H)
        if average:
            stacked = stacked.sum(dim=2) / stacked.shape[2]
        else:
            stacked = stacked[:, :, -1, :]
        return stacked.sum(dim=1) / stacked.shape[1]

    return summarise


def embedding_summary(embed: torch.Tensor, num_layers: int) -> Callable[[BatchEncoding], torch.Tensor]:
    """cheap_embed's s_l: the real tokens' embeddings summed over every prompt, normalised, per layer."""

    def summarise(tokens: BatchEncoding) -> torch.Tensor:
        ids = tokens["input_ids"]
        if int(ids.max()) >= embed.shape[0]:
            raise RouterError("the tokenizer produced a token id beyond the base model's embedding rows")
        h = embed.float()[ids]  # one row per token: one_hot(ids) @ embed, without the one-hot matrix
        summed = (h * tokens["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(num_layers, 1)

    return summarise


def router_rows(
    config: MoeConfig, base_dir: Path, num_layers: int, hidden_size: int, device: torch.device
) -> torch.Tensor:
    """Router rows for every gated expert (routed experts, then gated shared ones): (L, E, H)."""
    experts: list[Expert] = config.gated_experts
    shape = (num_layers, len(experts), hidden_size)
    if config.gate_mode == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(config.seed))
    if config.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden_size)
        return torch.rand(shape, generator=torch.Generator().manual_seed(config.seed)) * 2 * scale - scale

    tokenizer = prompt_tokenizer(base_dir)
    model = None
    if config.gate_mode == "cheap_embed":
        with TensorReader(base_dir) as reader:
            if EMBED not in reader.entries:
                raise RouterError(f"cheap_embed needs {EMBED}, which the base model lacks")
            summarise = embedding_summary(reader.load(EMBED), num_layers)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, use_safetensors=True)
        model = model.to(device).eval()
        summarise = hidden_summary(model, num_layers, average=config.gate_mode == "hidden_avg")

    rows = []
    for expert in experts:
        states = summarise(tokenize(expert.positive_prompts or [], tokenizer))
        if expert.negative_prompts:
            states -= summarise(tokenize(expert.negative_prompts, tokenizer))
        states /= states.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(states.cpu())
    del model
    return torch.stack(rows, dim=0).permute(1, 0, 2)
