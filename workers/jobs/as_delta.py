"""Models derived from a registered base, stored as that base plus a compressed delta (as the `variants` job
stores its variants): fine-tunes (of their `model`) and merges that name a `base_model`. The delta is
chosen per tensor within an error budget (workers.variants_delta); a model whose tensors do not match its
base (another vocabulary, other layers) stays a plain model. Unless the job keeps them, the full weights
are then dropped: the store holds the delta alone, and jobs that read the model get it materialised
(workers.store.delta_only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.jobs.context import JobContext
from workers.store.delta_only import describe_stored
from workers.store.references import is_registry_id
from workers.variants_delta import DeltaError, compress_variant, delta_base

DEFAULT_BUDGET = 0.05


def describer(base_dir: Path | None, keep_full_weights: bool) -> Callable[[Path], dict[str, Any]]:
    """`publish_model`'s describe_with: the registry fields, with `base_model` and `delta` where the model
    holds a delta of `base_dir`, whose full weights are dropped unless `keep_full_weights`."""
    return lambda path: describe_stored(path, base_dir, keep_full_weights)


def delta_base_dir(ctx: JobContext, base: str | None, budget: float | None) -> Path | None:
    """The base's directory when a model derived from `base` is to be stored as a delta of it: a budget is
    set and the base is a registered plain model (not itself a delta of another)."""
    if budget is None or base is None or not is_registry_id(base) or not ctx.registry.exists(base):
        return None
    directory = ctx.settings.models_dir / base
    return directory if delta_base(directory) is None else None


def store_as_delta(ctx: JobContext, base: str, base_dir: Path, out_dir: Path, budget: float) -> bool:
    """Write the delta of the model in `out_dir` to its base beside its weights; False (nothing written,
    a note in the job's log) when it does not fit the base."""
    ctx.note(f"storing the delta to {base}")
    try:
        compress_variant(base_dir, out_dir, out_dir, base_id=base, error_budget=budget)
    except DeltaError as e:
        ctx.note(f"kept as a full model, not a delta of {base}: {e}")
        return False
    return True
