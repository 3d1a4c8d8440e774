"""Merge methods over aligned tensors, registered by name in `workers.merge.registry.METHODS`."""

from workers.merge import (  # noqa: F401  (registers the methods)
    breadcrumbs,
    dare,
    della,
    linear,
    ram,
    sce,
    task_arithmetic,
    ties,
)
from workers.merge.registry import METHODS

__all__ = ["METHODS"]
