"""Merge methods over aligned tensors, registered by name in `workers.merge.registry.METHODS`."""

from workers.merge import (  # noqa: F401  (registers the methods)
    arcee_fusion,
    dare,
    linear,
    model_stock,
    nearswap,
    passthrough,
    slerp,
    spherical_mean,
    task_arithmetic,
    ties,
)
from workers.merge.registry import METHODS

__all__ = ["METHODS"]
