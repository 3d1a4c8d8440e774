"""What a merge recipe means tensor by tensor, without reading any tensor data.

For each tensor of the reference model: its layer position t (`parameters.layer_position`), and the
parameters the method will see there: per merged model (weight, density, ...) and global (normalize,
lambda, ...), each resolved by `parameters.resolve` (per-model setting, then global, then the method's
default). The executor calls `tensor_parameters` for every tensor it merges, so a dry run shows exactly
what the merge will use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.merge.config import MergeConfig
from workers.merge.homology import read_config
from workers.merge.parameters import layer_position, resolve
from workers.merge.registry import METHODS, MergeMethod
from workers.tensors.safetensors_io import TensorReader


def tensor_parameters(
    config: MergeConfig, method: MergeMethod, tensor_name: str, t: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per merged model, global) parameters for one tensor at layer position t."""
    model_params = [
        {
            key: resolve(
                key, method.model_params, e.parameters, config.parameters, tensor_name=tensor_name, t=t
            )
            for key in method.model_params
        }
        for e in config.merged_entries
    ]
    params = {
        key: resolve(key, method.global_params, config.parameters, tensor_name=tensor_name, t=t)
        for key in method.global_params
    }
    params["tie_break"] = config.tie_break
    return model_params, params


@dataclass
class TensorPlan:
    name: str
    shape: list[int]
    dtype: str
    t: float
    merged: bool  # False: not floating point, copied from the reference model
    models: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (merged model, its parameters)
    params: dict[str, Any] = field(default_factory=dict)


def plan_merge(config: MergeConfig, paths: dict[str, Path]) -> list[TensorPlan]:
    """The resolved parameters of every tensor of the reference model, in file order (headers only)."""
    method = METHODS[config.merge_method]
    reference = paths[config.reference_model]
    num_layers = int(read_config(reference).get("num_hidden_layers", 1))
    names = [e.model for e in config.merged_entries]
    plans = []
    for name, entry in TensorReader(reference).entries.items():
        dtype = str(entry.dtype).removeprefix("torch.")
        t = layer_position(name, num_layers)
        if not entry.dtype.is_floating_point:
            plans.append(TensorPlan(name, list(entry.shape), dtype, t, merged=False))
            continue
        model_params, params = tensor_parameters(config, method, name, t)
        plans.append(
            TensorPlan(
                name, list(entry.shape), dtype, t, True, list(zip(names, model_params, strict=True)), params
            )
        )
    return plans
