"""Merge methods over aligned tensors, registered by name in `workers.merge.registry.METHODS`."""

from workers.merge import (  # noqa: F401  (registers the methods)
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    linear,
    model_stock,
    nearswap,
    passthrough,
    ram,
    sce,
    slerp,
    spherical_mean,
    task_arithmetic,
    ties,
)
from workers.merge.registry import METHODS

__all__ = ["METHODS"]
