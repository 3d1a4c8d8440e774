"""Prune a model to a target: plan the sizes, drop layers, then cut widths.

Depth goes first (layers ranked by block influence on the source model); widths are ranked afterwards,
on the depth-pruned model, so the activation statistics describe the layers that remain.
mode="random" replaces both rankings by seeded uniform draws at the same target, as a baseline.
With `replace`, the depth cut of n layers removes a block of n + 1 contiguous layers and puts one fitted
layer in its place (`workers.prune.replace`): the same parameter count as dropping n layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from workers.prune.depth import drop_layers, least_influential, random_layers
from workers.prune.influence import block_influence
from workers.prune.layers import Progress
from workers.prune.replace import Block, FitOptions, FitReport, replace_block
from workers.prune.target import PrunePlan, PruneTarget, costs, plan
from workers.prune.width import activation_scores, prune_width_, random_scores

Mode = Literal["activation", "random"]


@dataclass
class PruneResult:
    model: nn.Module
    plan: PrunePlan
    source_params: int
    removed_layers: list[int] = field(default_factory=list)
    influence: list[float] | None = None
    replaced: Block | None = None  # with `replace`: the block cut and the layer its replacement started from
    fit: FitReport | None = None

    @property
    def removed_fraction(self) -> float:
        return 1 - self.plan.params / self.source_params


def _stage(progress: Progress | None, stage: int, stages: int, name: str) -> Progress | None:
    """Report a sub-step's progress as part of the whole run."""
    if progress is None:
        return None
    return lambda done, total, message: progress(stage * total + done, stages * total, f"{name}: {message}")


def prune(
    model: nn.Module,
    target: PruneTarget,
    calibration: Sequence[torch.Tensor],
    mode: Mode = "activation",
    seed: int = 0,
    progress: Progress | None = None,
    replace: FitOptions | None = None,
    fitting: Sequence[torch.Tensor] | None = None,
    masks: Sequence[torch.Tensor] | None = None,
) -> PruneResult:
    """A pruned copy of `model` whose config equals the planned sizes exactly; the source is untouched.

    `replace`: cut the depth by block replacement, the layer fitted on `fitting` (default: calibration),
    whose response tokens `masks` marks (`workers.prune.replace.replace_block`).
    """
    if mode not in ("activation", "random"):
        raise ValueError(f"mode must be 'activation' or 'random', got {mode!r}")
    the_plan = plan(model, target)
    c = costs(model)
    result = PruneResult(model=model, plan=the_plan, source_params=model.num_parameters())
    n_remove = c.layers - the_plan.num_hidden_layers
    if replace is not None and not n_remove:
        raise ValueError("replace needs a depth cut: the target keeps every layer")
    if replace is not None:
        seed_or_none = seed if mode == "random" else None
        stage = _stage(progress, 0, 2, "depth")
        done = replace_block(
            model, calibration, n_remove + 1, fitting, replace, seed_or_none, stage, masks=masks
        )
        result.replaced, result.fit, result.influence = done.block, done.fit, done.layer_influence
        result.removed_layers = done.block.layers
        pruned = done.model
    else:
        if n_remove and mode == "random":
            result.removed_layers = random_layers(c.layers, n_remove, seed)
        elif n_remove:
            result.influence = block_influence(model, calibration, _stage(progress, 0, 2, "depth"))
            result.removed_layers = least_influential(result.influence, n_remove)
        pruned = drop_layers(model, result.removed_layers)
    if (the_plan.intermediate_size, the_plan.num_key_value_heads) != (c.intermediate, c.kv_heads):
        if mode == "random":
            scores = random_scores(pruned, seed)
        else:
            scores = activation_scores(pruned, calibration, _stage(progress, 1, 2, "width"))
        prune_width_(pruned, scores, the_plan.intermediate_size, the_plan.num_key_value_heads)
    if pruned.num_parameters() != the_plan.params:
        raise RuntimeError(
            f"pruned model has {pruned.num_parameters()} parameters, plan says {the_plan.params}"
        )
    if progress is not None:
        progress(1, 1, "pruned")
    result.model = pruned
    return result
