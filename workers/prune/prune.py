"""Prune a model to a target: plan the sizes, drop layers, then cut widths.

Depth goes first (layers ranked by block influence on the source model); widths are ranked afterwards,
on the depth-pruned model, so the activation statistics describe the layers that remain.
mode="random" replaces both rankings by seeded uniform draws at the same target, as a baseline.
mode="learned" learns hard-concrete masks at every granularity, the hidden dimension included, towards the
target shape and keeps the top-scoring components (`workers.prune.shear`, LLM-Shearing).
With `replace`, the depth cut of n layers removes a block of n + 1 contiguous layers and puts one fitted
layer in its place (`workers.prune.replace`): the same parameter count as dropping n layers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from workers.prune.depth import drop_layers, least_influential, random_layers
from workers.prune.heal import cycled
from workers.prune.influence import block_influence
from workers.prune.layers import Progress, decoder_layers
from workers.prune.replace import Block, FitOptions, FitReport, replace_block
from workers.prune.shear import MaskOptions, MaskReport, Shape, extract, learn_masks
from workers.prune.target import PrunePlan, PruneTarget, costs, plan
from workers.prune.width import activation_scores, prune_width_, random_scores
from workers.train.data import Batch

Mode = Literal["activation", "random", "learned"]


@dataclass
class PruneResult:
    model: nn.Module
    plan: PrunePlan
    source_params: int
    removed_layers: list[int] = field(default_factory=list)
    influence: list[float] | None = None
    replaced: Block | None = None  # with `replace`: the block cut and the layer its replacement started from
    fit: FitReport | None = None
    masks: MaskReport | None = None  # mode learned: the mask phase

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
    stream: Iterator[Batch] | None = None,
    mask_options: MaskOptions | None = None,
) -> PruneResult:
    """A pruned copy of `model` whose config equals the planned sizes exactly; the source is untouched.

    `replace`: cut the depth by block replacement, the layer fitted on `fitting` (default: calibration),
    whose response tokens `masks` marks (`workers.prune.replace.replace_block`).
    mode "learned": the mask phase trains on `stream` (default: the calibration windows, cycled).
    """
    if mode not in ("activation", "random", "learned"):
        raise ValueError(f"mode must be 'activation', 'random' or 'learned', got {mode!r}")
    if mode == "learned":
        if replace is not None:
            raise ValueError("replace does not combine with mode learned")
        return _learned(model, target, stream or cycled(calibration), mask_options, progress)
    the_plan = plan(model, target)
    if target.hidden_size not in (None, model.config.hidden_size) or target.num_attention_heads not in (
        None,
        the_plan.num_attention_heads,
    ):
        raise ValueError("only mode learned cuts hidden_size or query heads within a KV group")
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


def target_shape(model: nn.Module, target: PruneTarget) -> Shape:
    """The exact shape a target asks for: layers, MLP and KV sizes as `plan` gives them (a budget planned
    along its axes), the hidden size and query heads as given (default: the source's, query heads following
    their KV groups)."""
    the_plan = plan(model, target)
    return Shape(
        num_hidden_layers=the_plan.num_hidden_layers,
        hidden_size=target.hidden_size or model.config.hidden_size,
        num_attention_heads=target.num_attention_heads or the_plan.num_attention_heads,
        num_key_value_heads=the_plan.num_key_value_heads,
        intermediate_size=the_plan.intermediate_size,
    )


def _learned(
    model: nn.Module,
    target: PruneTarget,
    stream: Iterator[Batch],
    options: MaskOptions | None,
    progress: Progress | None,
) -> PruneResult:
    shape = target_shape(model, target)
    learner = copy.deepcopy(model)
    gates, report = learn_masks(learner, shape, stream, options, progress)
    kept = gates.keep()
    pruned = extract(learner, kept)
    del learner
    layers = len(decoder_layers(model))
    kept_layers = set(kept["layer"].tolist()) if "layer" in kept else set(range(layers))
    the_plan = PrunePlan(
        num_hidden_layers=shape.num_hidden_layers,
        intermediate_size=shape.intermediate_size,
        num_key_value_heads=shape.num_key_value_heads,
        num_attention_heads=shape.num_attention_heads,
        hidden_size=shape.hidden_size,
        params=pruned.num_parameters(),
    )
    result = PruneResult(model=pruned, plan=the_plan, source_params=model.num_parameters(), masks=report)
    result.removed_layers = [i for i in range(layers) if i not in kept_layers]
    if progress is not None:
        progress(1, 1, "pruned")
    return result
