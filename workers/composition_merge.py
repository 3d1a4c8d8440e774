"""A per-request TIES or DARE merge of variants of one base, as a delta over the base: what a merge job with
the same recipe would write, tensor by tensor, less the base.

For each floating tensor with base theta_0 and the merged models' theta_i (read as a merge job reads them:
the model's own weights where its directory has them, else materialised as theta_0 + D_hat_i from its
stored delta, workers.variants_delta), the merge job's method function (workers.merge.ties,
workers.merge.dare) runs on the same TensorGroup: the same parameters (the model's own, else the recipe's,
else the method's default), the same per-(tensor, model) generators `tensor_seed(seed, name, i)`, in the
tensor's own dtype. The served delta is D = theta_merged - theta_0 (dense); tensors no model changes are
left out (every method gives theta_0 there). Memory: a few tensors at a time besides the result.
Nothing here knows about HTTP or Redis.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from workers.composition import Computed
from workers.generation.deltas import DenseDelta, VariantDelta, build_variant
from workers.merge.executor import tensor_seed
from workers.merge.parameters import resolve
from workers.merge.registry import METHODS, TensorGroup
from workers.tensors.safetensors_io import TensorReader, has_weights
from workers.variants_delta import decoded_delta, delta_base, read_parts


class _Model:
    """One merged model's tensors as a merge job reads them."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
        self.reader = stack.enter_context(TensorReader(directory)) if has_weights(directory) else None
        self.parts = read_parts(directory) if delta_base(directory) is not None else {}

    def tensor(self, name: str, base: torch.Tensor) -> torch.Tensor:
        if self.reader is not None:
            if name not in self.reader.entries:
                raise ValueError(f"a merged model lacks the base's tensor {name[:80]!r}")
            return self.reader.load(name).to(base.dtype)
        if name not in self.parts:
            return base
        return (base.float() + decoded_delta(self.parts[name], tuple(base.shape))).to(base.dtype)


def merged_deltas(recipe: Computed, base_dir: Path, dirs: dict[str, Path]) -> dict[str, torch.Tensor]:
    """{tensor name: theta_merged - theta_0 (float32)} for the tensors the merge changes."""
    method = METHODS[recipe.merge_method]
    sources = [(model, params) for model, params in recipe.models if model != recipe.base_model]
    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        base = stack.enter_context(TensorReader(base_dir))
        models = [_Model(dirs[model], stack) for model, _ in sources]
        for name in base.names:
            entry = base.entries[name]
            if not entry.dtype.is_floating_point:
                continue
            theta0 = base.load(name)
            tensors = [model.tensor(name, theta0) for model in models]
            if all(t is theta0 or torch.equal(t, theta0) for t in tensors):
                continue
            model_params = [
                {
                    k: resolve(k, method.model_params, p, recipe.parameters, tensor_name=name, t=0.0)
                    for k in method.model_params
                }
                for _, p in sources
            ]
            params: dict[str, Any] = {
                k: resolve(k, method.global_params, recipe.parameters, tensor_name=name, t=0.0)
                for k in method.global_params
            }
            params["tie_break"] = "mergekit"
            seeds = [tensor_seed(recipe.seed, name, i) for i in range(len(tensors))] if method.random else []
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            group = TensorGroup(name, theta0, tensors, model_params, params, generators)
            merged = method.fn(group).to(entry.dtype)
            delta = merged.float() - theta0.float()
            if bool(delta.any()):
                out[name] = delta
    return out


def computed_variant(
    recipe: Computed, base_dir: Path, dirs: dict[str, Path], compact, name: str | None = None
) -> VariantDelta:
    """The engine's VariantDelta of the merge (dense deltas in the engine's activation dtype)."""
    deltas: dict[str, Any] = {
        tensor: DenseDelta(delta, compact.dtype) if delta.dim() == 2 else delta
        for tensor, delta in merged_deltas(recipe, base_dir, dirs).items()
    }
    return build_variant(name or recipe.key(), compact, deltas)
