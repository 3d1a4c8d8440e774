"""Which input tensors make each output tensor, for both recipe forms (mergekit's planning).

- models form: every tensor of the reference model, from the same-named tensor of every input; the
  gradient position t is the tensor's decoder layer over the model's layers (0 outside the layers).
- slices form: the output stacks the slices' layers in order and renumbers them 0..L-1; output layer j
  of a slice that starts at output layer o takes layer start + (j - o) of every source, and t = (j - o) /
  (n - 1) over the slice's n layers (1 when n == 1). Tensors outside the layers follow mergekit's
  architecture split: embeddings (names holding "embed") come before the layers, from the first slice's
  sources; the rest (final norm, lm_head) come after, from the last slice's sources; both with t = 0.

A recipe that builds its own vocabulary (tokenizer_source / tokenizer:) may have inputs whose embedding
and LM-head tensors differ in rows; the executor moves those rows onto the output vocabulary.

Only headers and config.json are read, so the plan doubles as the pre-queue check of a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.merge.config import MergeConfig, SliceSource, SliceSpec
from workers.merge.homology import VOCABULARY_TENSORS, HomologyError, check_homologous, read_config
from workers.merge.parameters import LAYER, layer_position
from workers.merge.vocabulary import builds_vocabulary
from workers.tensors.safetensors_io import TensorEntry, TensorReader


class SliceError(HomologyError):
    """A slices recipe that does not fit its models (a layer range past the end, differing shapes)."""


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor: its inputs' tensor names (aligned with the slice's sources) and where it sits."""

    name: str
    slice: SliceSpec
    inputs: tuple[str, ...]  # the input tensor name in each of slice.sources
    t: float
    entry: TensorEntry  # dtype and shape (of the first input)


@dataclass(frozen=True)
class MergePlan:
    tensors: list[OutputTensor]
    reference: str
    num_layers: int  # of the output
    layer_origin: list[tuple[str, int]]  # per output layer: (model, its layer index there)

    def output_bytes(self, dtype: torch.dtype | None = None, vocab_rows: int | None = None) -> int:
        """Bytes of the output, floating tensors counted at `dtype` when given, and embedding / LM-head
        tensors at `vocab_rows` rows when the recipe builds its own vocabulary."""
        total = 0
        for t in self.tensors:
            floating = dtype is not None and t.entry.dtype.is_floating_point
            numel, rows = t.entry.numel, (t.entry.shape or (0,))[0]
            if vocab_rows is not None and t.name.endswith(VOCABULARY_TENSORS) and rows:
                numel = numel // rows * vocab_rows
            total += numel * (dtype.itemsize if floating else t.entry.dtype.itemsize)
        return total


def renumber(name: str, layer: int) -> str:
    """`name` with its decoder-layer index replaced by `layer`."""
    match = LAYER.search(name)
    assert match is not None
    return f"{name[: match.start(1)]}{layer}{name[match.end(1) :]}"


def plan_merge(config: MergeConfig, paths: dict[str, Path]) -> MergePlan:
    """The output tensors of `config` over the model directories `paths` (HomologyError if they don't fit)."""
    if config.slices is None:
        return _plan_models(config, paths)
    return _plan_slices(config, paths)


def _plan_models(config: MergeConfig, paths: dict[str, Path]) -> MergePlan:
    reference = config.reference_model
    # reference first; a recipe that builds its own vocabulary (workers.merge.vocabulary) lets the
    # embedding and LM-head tensors differ in their number of rows
    check_homologous({ref: paths[ref] for ref in config.input_models}, builds_vocabulary(config))
    num_layers = int(read_config(paths[reference]).get("num_hidden_layers", 1))
    (spec,) = config.slice_specs
    with TensorReader(paths[reference]) as reader:
        entries = reader.entries
    tensors = [
        OutputTensor(name, spec, (name,) * len(spec.sources), layer_position(name, num_layers), entry)
        for name, entry in entries.items()
    ]
    return MergePlan(tensors, reference, num_layers, [(reference, i) for i in range(num_layers)])


def _layers_of(entries: dict[str, TensorEntry]) -> dict[int, list[str]]:
    layers: dict[int, list[str]] = {}
    for name in entries:
        match = LAYER.search(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(name)
    return layers


def _plan_slices(config: MergeConfig, paths: dict[str, Path]) -> MergePlan:
    refs = config.input_models
    configs = {ref: read_config(paths[ref]) for ref in refs}
    first = config.slices[0].sources[0].model
    for ref in refs:
        if configs[ref].get("architectures") != configs[first].get("architectures"):
            raise SliceError(
                f"model {ref!r} is a {configs[ref].get('architectures')}, "
                f"but {first!r} is a {configs[first].get('architectures')}"
            )
    entries: dict[str, dict[str, TensorEntry]] = {}
    for ref in refs:
        with TensorReader(paths[ref]) as reader:
            entries[ref] = reader.entries
    layers = {ref: _layers_of(entries[ref]) for ref in refs}
    depth = {ref: int(configs[ref].get("num_hidden_layers", len(layers[ref]))) for ref in refs}
    if not layers[first]:
        raise SliceError(f"model {first!r} has no decoder layers named '...layers.<i>...' to slice")

    specs = config.slice_specs
    for i, spec in enumerate(specs):
        for source in spec.sources:
            start, end = source.layer_range
            if end > depth[source.model]:
                raise SliceError(
                    f"slice {i}: layer_range [{start}, {end}) exceeds model {source.model!r}, "
                    f"which has {depth[source.model]} layers"
                )

    def planned(name: str, spec: SliceSpec, inputs: list[str], t: float) -> OutputTensor:
        shapes = []
        for source, tensor in zip(spec.sources, inputs, strict=True):
            entry = entries[source.model].get(tensor)
            if entry is None:
                raise SliceError(f"model {source.model!r} has no tensor {tensor!r} (for output {name!r})")
            shapes.append((source.model, tensor, entry))
        (ref0, tensor0, entry0), *others = shapes
        rows_may_differ = builds_vocabulary(config) and name.endswith(VOCABULARY_TENSORS)
        for ref, tensor, entry in others:
            if entry.shape != entry0.shape and not (rows_may_differ and entry.shape[1:] == entry0.shape[1:]):
                raise SliceError(
                    f"tensor {tensor!r} has shape {list(entry.shape)} in {ref!r} "
                    f"but {list(entry0.shape)} ({tensor0!r}) in {ref0!r}"
                )
        return OutputTensor(name, spec, tuple(inputs), t, entry0)

    def outside(spec: SliceSpec, pre: bool) -> list[OutputTensor]:
        names = [n for n in entries[spec.sources[0].model] if not LAYER.search(n) and ("embed" in n) == pre]
        return [planned(n, spec, [n] * len(spec.sources), 0.0) for n in names]

    tensors = outside(specs[0], pre=True)
    origin: list[tuple[str, int]] = []
    for spec in specs:
        start0, end0 = spec.sources[0].layer_range
        count = end0 - start0
        for offset in range(count):
            t = offset / (count - 1) if count > 1 else 1.0
            out_layer = len(origin)
            lead = spec.sources[0]
            for name in layers[lead.model].get(start0 + offset, []):
                inputs = [renumber(name, _start(s) + offset) for s in spec.sources]
                tensors.append(planned(renumber(name, out_layer), spec, inputs, t))
            origin.append((lead.model, start0 + offset))
    tensors += outside(specs[-1], pre=False)
    return MergePlan(tensors, config.reference_model, len(origin), origin)


def _start(source: SliceSource) -> int:
    assert source.layer_range is not None
    return source.layer_range[0]


def output_config(plan: MergePlan, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The reference's config with the output's layer count (and per-layer lists such as layer_types
    taken from each output layer's origin)."""
    out = dict(configs[plan.reference])
    if out.get("num_hidden_layers") == plan.num_layers and all(
        ref == plan.reference and i == j for j, (ref, i) in enumerate(plan.layer_origin)
    ):
        return out
    out["num_hidden_layers"] = plan.num_layers
    for key in ("layer_types",):
        if isinstance(out.get(key), list):
            out[key] = [configs[ref][key][i] for ref, i in plan.layer_origin]
    return out
