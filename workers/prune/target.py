"""Prune targets and the planner that turns a parameter budget into exact layer / MLP / KV sizes.

All decoder layers share one shape, so the parameter count of a pruned model is affine in each size:

    P(L, I, K) = P_fixed + L * (P_layer - (I0 - I) * c_mlp - (K0 - K) * c_kv)

P_fixed: embeddings, final norm, untied LM head; c_mlp: parameters of one MLP channel (a gate row, an up
row, a down column); c_kv: parameters of one KV group (its key and value heads, its n_rep query heads and
their o_proj columns). The costs are read from the model's own modules, so biases count where present.

For a budget the planner searches every (L, I, K) the allowed axes permit and keeps those with
P <= budget; among them it takes the one whose largest relative cut max(1 - L/L0, 1 - I/I0, 1 - K/K0) is
smallest (spread the cut evenly), then the one with the most parameters.

A budget shrinks the width axes (mlp, kv) by default: at equal parameter count, width pruning loses less
than depth pruning (Minitron, arXiv 2407.14679; measured on SmolLM2-135M in docs/prune-grow.md).
Name "depth" in `axes` to let the planner drop layers too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from torch import nn

from workers.prune.layers import decoder_layers
from workers.prune.width import attention_shape

Axis = Literal["depth", "mlp", "kv"]


SIZE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "param_budget",
)


def sizes_given(target: object) -> bool:
    """Whether `target` (a PruneTarget or a request shaped like one) names any size or a budget."""
    return any(getattr(target, name) is not None for name in SIZE_FIELDS)


class PruneTarget(BaseModel):
    """What the pruned model should be: explicit sizes, or a parameter budget for the planner to meet.

    Sizes left out keep the source's value, unless a param_budget is given, in which case the planner
    chooses them along `axes` (width only by default). Explicit sizes are always kept exactly.
    """

    num_hidden_layers: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=1)
    num_key_value_heads: int | None = Field(default=None, ge=1)
    param_budget: int | None = Field(default=None, ge=1)
    hidden_size: int | None = Field(default=None, ge=1, description="mode learned only")
    num_attention_heads: int | None = Field(default=None, ge=1, description="mode learned only")
    axes: tuple[Axis, ...] = ("mlp", "kv")
    intermediate_multiple: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _something_to_do(self) -> PruneTarget:
        if not sizes_given(self):
            raise ValueError(f"give at least one of {', '.join(SIZE_FIELDS)}")
        if not self.axes:
            raise ValueError("axes must name at least one of depth, mlp, kv")
        return self


class PrunePlan(BaseModel):
    """The exact shape of the pruned model and its parameter count."""

    num_hidden_layers: int
    intermediate_size: int
    num_key_value_heads: int
    num_attention_heads: int
    params: int
    hidden_size: int | None = None  # set where the hidden dimension is cut (mode learned)


@dataclass(frozen=True)
class Costs:
    fixed: int
    layer: int
    mlp_channel: int
    kv_group: int
    layers: int
    intermediate: int
    kv_heads: int
    n_rep: int

    def params(self, layers: int, intermediate: int, kv_heads: int) -> int:
        """P(L, I, K) of the module docstring."""
        per_layer = (
            self.layer
            - (self.intermediate - intermediate) * self.mlp_channel
            - (self.kv_heads - kv_heads) * self.kv_group
        )
        return self.fixed + layers * per_layer


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rows_cost(linear: nn.Linear, rows: int) -> int:
    """Parameters carried by `rows` output rows of a Linear (weight rows plus bias entries)."""
    return rows * (linear.in_features + (1 if linear.bias is not None else 0))


def costs(model: nn.Module) -> Costs:
    """The per-unit parameter costs of a uniform LLaMA-style model, read from its first layer."""
    layers = decoder_layers(model)
    first = layers[0]
    kv_heads, n_rep, head_dim = attention_shape(model)
    mlp, attn = first.mlp, first.self_attn
    mlp_channel = _rows_cost(mlp.gate_proj, 1) + _rows_cost(mlp.up_proj, 1) + mlp.down_proj.out_features
    kv_group = (
        _rows_cost(attn.q_proj, n_rep * head_dim)
        + _rows_cost(attn.k_proj, head_dim)
        + _rows_cost(attn.v_proj, head_dim)
        + n_rep * head_dim * attn.o_proj.out_features
    )
    layer = _count(first)
    return Costs(
        fixed=model.num_parameters() - sum(_count(layer_) for layer_ in layers),
        layer=layer,
        mlp_channel=mlp_channel,
        kv_group=kv_group,
        layers=len(layers),
        intermediate=mlp.down_proj.in_features,
        kv_heads=kv_heads,
        n_rep=n_rep,
    )


def _choices(fixed: int | None, source: int, allowed: bool, step: int = 1) -> list[int]:
    if fixed is not None:
        return [fixed]
    if not allowed:
        return [source]
    return sorted({*range(step, source + 1, step), source})


def plan(model: nn.Module, target: PruneTarget) -> PrunePlan:
    """The exact sizes that meet the target (see the module docstring for how a budget is split)."""
    c = costs(model)
    for name, value, source in (
        ("num_hidden_layers", target.num_hidden_layers, c.layers),
        ("intermediate_size", target.intermediate_size, c.intermediate),
        ("num_key_value_heads", target.num_key_value_heads, c.kv_heads),
    ):
        if value is not None and value > source:
            raise ValueError(f"{name}={value} exceeds the source's {source}; pruning only shrinks")
    budget = target.param_budget
    layer_opts = _choices(target.num_hidden_layers, c.layers, budget is not None and "depth" in target.axes)
    mlp_opts = _choices(
        target.intermediate_size,
        c.intermediate,
        budget is not None and "mlp" in target.axes,
        target.intermediate_multiple,
    )
    kv_opts = _choices(target.num_key_value_heads, c.kv_heads, budget is not None and "kv" in target.axes)
    best: tuple[float, int, int, int, int] | None = None
    for layers in layer_opts:
        for kv in kv_opts:
            for inter in mlp_opts:
                params = c.params(layers, inter, kv)
                if budget is not None and params > budget:
                    continue
                cut = max(1 - layers / c.layers, 1 - inter / c.intermediate, 1 - kv / c.kv_heads)
                key = (cut, -params, layers, inter, kv)
                if best is None or key < best:
                    best = key
    if best is None:
        raise ValueError(f"no model along axes {target.axes} fits in {budget} parameters")
    _, neg_params, layers, inter, kv = best
    return PrunePlan(
        num_hidden_layers=layers,
        intermediate_size=inter,
        num_key_value_heads=kv,
        num_attention_heads=kv * c.n_rep,
        params=-neg_params,
    )
