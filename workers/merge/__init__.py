"""Merge methods over aligned tensors, registered by name in `workers.merge.registry.METHODS`."""

from workers.merge import dare, linear, task_arithmetic, ties  # noqa: F401  (registers the methods)
from workers.merge.registry import METHODS

__all__ = ["METHODS"]
