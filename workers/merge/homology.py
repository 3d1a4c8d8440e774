"""Homologous models share an architecture, tensor names and tensor shapes (they come from one base)."""

from __future__ import annotations

from pathlib import Path

from workers.store.model_files import read_config
from workers.tensors.safetensors_io import TensorReader

VOCABULARY_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # rows indexed by token id (axis 0)


class HomologyError(ValueError):
    """Models that cannot be merged tensor by tensor."""


def check_homologous(models: dict[str, Path], vocabulary_rows_may_differ: bool = False) -> None:
    """Raise HomologyError naming the first model and tensor that differ from the first model. With
    `vocabulary_rows_may_differ` (a merge that builds its own vocabulary), embedding and LM-head tensors
    may differ in their number of rows."""
    (ref_name, ref_dir), *others = models.items()
    ref_arch = read_config(ref_dir).get("architectures")
    ref = {name: e.shape for name, e in TensorReader(ref_dir).entries.items()}
    for name, directory in others:
        arch = read_config(directory).get("architectures")
        if arch != ref_arch:
            raise HomologyError(f"model {name!r} is a {arch}, but {ref_name!r} is a {ref_arch}")
        shapes = {n: e.shape for n, e in TensorReader(directory).entries.items()}
        for tensor, shape in ref.items():
            if tensor not in shapes:
                raise HomologyError(f"model {name!r} has no tensor {tensor!r} (present in {ref_name!r})")
            theirs = shapes[tensor]
            rows_only = tensor.endswith(VOCABULARY_TENSORS) and theirs[1:] == shape[1:]  # vocabularies differ
            if theirs != shape and not (rows_only and vocabulary_rows_may_differ):
                hint = (
                    "; set tokenizer_source to merge models with different vocabularies" if rows_only else ""
                )
                raise HomologyError(
                    f"tensor {tensor!r} has shape {list(shapes[tensor])} in {name!r} "
                    f"but {list(shape)} in {ref_name!r}{hint}"
                )
        extra = sorted(set(shapes) - set(ref))
        if extra:
            raise HomologyError(f"model {name!r} has tensor {extra[0]!r} that {ref_name!r} lacks")
