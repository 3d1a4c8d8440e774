"""Output architectures of an MoE built from dense experts, chosen as mergekit-moe 0.1.5 chooses them.

- Mixtral (preferred): LLaMA or Mistral experts, no shared expert. Per layer, the experts' MLPs are fused
  the way transformers stores Mixtral: `experts.gate_up_proj[e] = [gate_proj_e; up_proj_e]` (E, 2I, H),
  `experts.down_proj[e] = down_proj_e` (E, H, I), router `mlp.gate.weight` (E, H).
- Qwen2-MoE: LLaMA, Mistral or Qwen2 experts and exactly one shared expert with prompts (or a random gate
  mode). Per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, the shared expert's MLP as
  `mlp.shared_expert.*`, routers `mlp.gate.weight` (E, H) and `mlp.shared_expert_gate.weight` (1, H);
  q/k/v biases the base lacks are zeros.
Every other tensor comes from the base model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import MistralConfig, MixtralConfig, PretrainedConfig, Qwen2MoeConfig

from workers.moe.config import RANDOM_MODES, MoeConfig

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class LayoutError(ValueError):
    """No output architecture can hold these experts."""


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output, made on demand (so the writer streams them one at a time)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


# (expert index, tensor name) -> the expert's tensor after noise and scaling; the shared expert is -1
ExpertTensor = Callable[[int, str], torch.Tensor]
BaseTensor = Callable[[str], torch.Tensor]


def _model_types(config: MoeConfig, configs: dict[str, dict[str, Any]], shared: bool) -> set[str]:
    refs = [config.base_model] + [e.source_model for e in config.experts]
    if shared:
        refs += [e.source_model for e in config.shared_experts or []]
    return {str(configs[ref].get("model_type")) for ref in refs}


def choose_layout(config: MoeConfig, configs: dict[str, dict[str, Any]]) -> str:
    """'mixtral' or 'qwen', as mergekit-moe would pick for this recipe; LayoutError says why neither fits."""
    reasons = {}
    shared = config.shared_experts or []
    if shared:
        reasons["mixtral"] = "Mixtral has no shared experts"
    else:
        types = _model_types(config, configs, shared=False)
        if len(types) != 1 or not types <= {"llama", "mistral"}:
            reasons["mixtral"] = f"Mixtral needs LLaMA or Mistral models of one type, got {sorted(types)}"
    if len(shared) != 1:
        reasons["qwen"] = "Qwen2-MoE needs exactly one shared expert"
    elif config.gate_mode not in RANDOM_MODES and not shared[0].positive_prompts:
        reasons["qwen"] = (
            "Qwen2-MoE needs prompts for the shared expert (mergekit makes a DeepSeek-MoE of a shared "
            "expert without prompts; Strata does not build that architecture)"
        )
    else:
        types = _model_types(config, configs, shared=True)
        if len(types) != 1 or not types <= {"llama", "mistral", "qwen2"}:
            reasons["qwen"] = (
                f"Qwen2-MoE needs LLaMA, Mistral or Qwen2 models of one type, got {sorted(types)}"
            )
    candidates = [name for name in ("mixtral", "qwen") if name not in reasons]
    if config.architecture:
        if config.architecture in reasons:
            raise LayoutError(f"architecture {config.architecture}: {reasons[config.architecture]}")
        return config.architecture
    if not candidates:
        raise LayoutError("no MoE architecture fits these models: " + "; ".join(reasons.values()))
    return candidates[0]


def output_config(
    layout: str, base: PretrainedConfig, config: MoeConfig, dtype: torch.dtype | None
) -> PretrainedConfig:
    """The output's config: the base's, converted to the MoE class, with the expert counts set."""
    if layout == "mixtral":
        if not isinstance(base, MistralConfig):
            mistral = MistralConfig(**base.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base.max_position_embeddings
            base = mistral
        out = MixtralConfig(**base.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = len(config.experts)
        out.num_experts_per_tok = config.experts_per_token
        out.sliding_window = None
    else:
        out = Qwen2MoeConfig(**base.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM"]
        out.num_experts = len(config.experts)
        out.num_experts_per_tok = config.experts_per_token
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.sliding_window = None
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = out.intermediate_size
        out.moe_intermediate_size = out.intermediate_size
    if dtype is not None or layout == "mixtral":
        out.dtype = dtype
    return out


def is_mlp(name: str) -> bool:
    return ".mlp." in name


def _copy(source: BaseTensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    return source(name).to(dtype)


def _fused_gate_up(source: ExpertTensor, prefix: str, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """(E, 2I, H): expert e's [gate_proj; up_proj], stacked over the experts."""
    pairs = [
        torch.cat([source(e, f"{prefix}.gate_proj.weight"), source(e, f"{prefix}.up_proj.weight")])
        for e in range(experts)
    ]
    return torch.stack(pairs).to(dtype)


def _fused_down(source: ExpertTensor, prefix: str, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """(E, H, I): the experts' down_proj, stacked."""
    return torch.stack([source(e, f"{prefix}.down_proj.weight") for e in range(experts)]).to(dtype)


def _expert(source: ExpertTensor, owner: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    return source(owner, name).to(dtype)


def _router_rows(routers: torch.Tensor, layer: int, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    return routers[layer, rows].to(dtype).contiguous()


def plan_tensors(
    layout: str,
    config: MoeConfig,
    base_entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    num_layers: int,
    routers: torch.Tensor,
    out_dtype: torch.dtype | None,
    base_tensor: BaseTensor,
    expert_tensor: ExpertTensor,
) -> list[OutputTensor]:
    """Every output tensor, in write order: the base's non-MLP tensors, then per layer the experts and the
    routers. `routers` is (L, gated experts, H)."""

    def cast(dtype: torch.dtype) -> torch.dtype:
        return out_dtype if out_dtype is not None and dtype.is_floating_point else dtype

    float_dtype = out_dtype or next(d for d, _ in base_entries.values() if d.is_floating_point)
    plan: list[OutputTensor] = []
    for name, (dtype, shape) in base_entries.items():
        if is_mlp(name):
            continue
        plan.append(OutputTensor(name, cast(dtype), shape, partial(_copy, base_tensor, name, cast(dtype))))
        if layout == "qwen" and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            bias = name.removesuffix("weight") + "bias"
            if bias not in base_entries:  # Qwen2-MoE has q/k/v biases; a LLaMA base gets zeros
                zeros = partial(torch.zeros, shape[0], dtype=float_dtype)
                plan.append(OutputTensor(bias, float_dtype, (shape[0],), zeros))

    experts = len(config.experts)
    router_dtype = out_dtype or routers.dtype
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}.mlp"
        gate_dtype, (inter, hidden) = base_entries[f"{prefix}.gate_proj.weight"]
        mlp_dtype = cast(gate_dtype)
        if layout == "mixtral":
            plan += [
                OutputTensor(
                    f"{prefix}.experts.gate_up_proj",
                    mlp_dtype,
                    (experts, 2 * inter, hidden),
                    partial(_fused_gate_up, expert_tensor, prefix, experts, mlp_dtype),
                ),
                OutputTensor(
                    f"{prefix}.experts.down_proj",
                    mlp_dtype,
                    (experts, hidden, inter),
                    partial(_fused_down, expert_tensor, prefix, experts, mlp_dtype),
                ),
            ]
        else:
            owners = [(e, f"experts.{e}") for e in range(experts)] + [(-1, "shared_expert")]
            for owner, label in owners:
                for projection in MLP_PROJECTIONS:
                    source = f"{prefix}.{projection}.weight"
                    plan.append(
                        OutputTensor(
                            f"{prefix}.{label}.{projection}.weight",
                            mlp_dtype,
                            base_entries[source][1],
                            partial(_expert, expert_tensor, owner, source, mlp_dtype),
                        )
                    )
        plan.append(
            OutputTensor(
                f"{prefix}.gate.weight",
                router_dtype,
                (experts, hidden),
                partial(_router_rows, routers, layer, slice(0, experts), router_dtype),
            )
        )
        if layout == "qwen":
            plan.append(
                OutputTensor(
                    f"{prefix}.shared_expert_gate.weight",
                    router_dtype,
                    (1, hidden),
                    partial(_router_rows, routers, layer, slice(experts, experts + 1), router_dtype),
                )
            )
    return plan
