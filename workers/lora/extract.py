"""LoRA extraction: each linear layer's delta factored into a low-rank product B @ A by a truncated SVD
(mergekit-extract-lora's semantics), written as a PEFT adapter directory, one module at a time.

For a linear layer's delta D = W_model - W_base (out x in), with SVD D = U diag(s) V^T (s descending):

    r = min(max_rank, len(s)), and with sv_epsilon > 0 also r <= #(s_j > sv_epsilon)
    A = diag(sqrt(s_1..r)) V_r^T  (r x in),   B = U_r diag(sqrt(s_1..r))  (out x r)
    B @ A is the best rank-r approximation of D; its relative error ||D - B A||_F / ||D||_F
    = sqrt(sum_{j > r} s_j^2 / sum_j s_j^2) is reported per module (0 for D = 0)

lora_alpha = r per module, so PEFT adds exactly B @ A. A bias delta goes to lora_B's bias. As mergekit
does by default, the embeddings, the LM head and modules that are not linear (norms) are stored at full
rank from the model (PEFT's `modules_to_save`). A module whose r is 0 (every singular value <= sv_epsilon)
gets no adapter weights and is reported with rank 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from workers.tensors.safetensors_io import AppendingWriter, TensorReader

Progress = Callable[[int, int, str], None]
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class ExtractionError(ValueError):
    """A model pair that cannot be turned into an adapter."""


@dataclass
class ModulePlan:
    name: str  # the module's name in the model, e.g. model.layers.0.self_attn.q_proj
    low_rank: bool  # True: factor the delta; False: store the model's weights at full rank
    weight: str  # the tensor holding its weight (the input embedding for a tied LM head)
    bias: str | None


@dataclass
class ExtractionResult:
    modules: dict[str, dict[str, float | int]] = field(default_factory=dict)  # name -> rank, relative_error
    full_rank: list[str] = field(default_factory=list)
    rank: int = 0  # the largest rank of any module
    bytes_written: int = 0


def plan_modules(model_dir: Path, tensor_names: set[str]) -> list[ModulePlan]:
    """Every module with a weight, from the model's architecture built on the meta device (no weights
    read, no remote code): linear layers are factored, embeddings, LM head and the rest kept whole."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    embed_in, embed_out = model.get_input_embeddings(), model.get_output_embeddings()
    embed_in_name = next(n for n, m in model.named_modules() if m is embed_in)
    plans = []
    for name, module in model.named_modules():
        if not isinstance(module._parameters.get("weight"), torch.Tensor):
            continue
        weight = f"{name}.weight"
        if weight not in tensor_names:
            if module is embed_out and f"{embed_in_name}.weight" in tensor_names:
                weight = f"{embed_in_name}.weight"  # tied: the head is the input embedding
            else:
                raise ExtractionError(f"the model has no tensor {weight!r} that its config implies")
        bias = f"{name}.bias" if f"{name}.bias" in tensor_names else None
        whole = module is embed_in or module is embed_out or isinstance(module, nn.Embedding)
        plans.append(ModulePlan(name, isinstance(module, nn.Linear) and not whole, weight, bias))
    return plans


def low_rank_factors(
    delta: torch.Tensor, max_rank: int, sv_epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative error) for a 2-D delta (see the module docstring); A and B in the delta's dtype."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    rank = min(max_rank, s.shape[0])
    if sv_epsilon > 0:
        rank = min(int((s > sv_epsilon).sum()), rank)
    energy = s.double().square()
    total = float(energy.sum())
    error = math.sqrt(float(energy[rank:].sum()) / total) if total > 0 else 0.0
    root = torch.sqrt(s[:rank])
    a = root.unsqueeze(1) * vh[:rank]
    b = u[:, :rank] * root.unsqueeze(0)
    return a.to(delta.dtype), b.to(delta.dtype), error


def adapter_config(
    base: str, ranks: dict[str, int], full_rank: list[str], has_bias: bool
) -> dict[str, object]:
    """PEFT's LoraConfig for modules of differing rank: r and lora_alpha the largest rank, the others in
    rank_pattern / alpha_pattern (alpha = rank everywhere: scaling 1)."""
    r = max(ranks.values())
    different = {name: rank for name, rank in ranks.items() if rank != r}
    config: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": different,
        "alpha_pattern": different,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in ranks}),
        "modules_to_save": sorted({name.rsplit(".", 1)[-1] for name in full_rank}),
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    if has_bias:
        config["lora_bias"] = True
    return config


def extract_lora(
    model_dir: Path,
    base_dir: Path,
    out_dir: Path,
    *,
    base_name: str,
    max_rank: int,
    sv_epsilon: float = 0.0,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> ExtractionResult:
    """Write `out_dir`/adapter_model.safetensors and adapter_config.json, module by module."""
    device = device or torch.device("cpu")
    result = ExtractionResult()
    ranks: dict[str, int] = {}
    has_bias = False
    with TensorReader(model_dir) as model, TensorReader(base_dir) as base:
        plans = plan_modules(model_dir, set(model.entries))
        writer = AppendingWriter(out_dir / ADAPTER_WEIGHTS)
        try:
            for i, plan in enumerate(plans):
                prefix = f"base_model.model.{plan.name}"
                if not plan.low_rank:
                    writer.write(f"{prefix}.weight", model.load(plan.weight))
                    if plan.bias:
                        writer.write(f"{prefix}.bias", model.load(plan.bias))
                    result.full_rank.append(plan.name)
                else:
                    delta = model.load(plan.weight).to(device) - base.load(plan.weight).to(device)
                    a, b, error = low_rank_factors(delta, max_rank, sv_epsilon)
                    result.modules[plan.name] = {"rank": a.shape[0], "relative_error": round(error, 6)}
                    if a.shape[0] > 0:
                        ranks[plan.name] = a.shape[0]
                        writer.write(f"{prefix}.lora_A.weight", a)
                        writer.write(f"{prefix}.lora_B.weight", b)
                        if plan.bias:
                            bias = model.load(plan.bias).to(device) - base.load(plan.bias).to(device)
                            writer.write(f"{prefix}.lora_B.bias", bias)
                            has_bias = True
                if progress:
                    progress(i + 1, len(plans), f"{i + 1}/{len(plans)} modules extracted")
            if not ranks:
                raise ExtractionError(
                    f"no linear layer differs from the base by a singular value above sv_epsilon={sv_epsilon}"
                )
            writer.close()
        except BaseException:
            writer.abort()
            raise
    config = adapter_config(base_name, ranks, result.full_rank, has_bias)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    result.rank = int(config["r"])
    result.bytes_written = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return result
