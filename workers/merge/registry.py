"""Merge methods by name. A method is a function over one group of aligned tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TensorGroup:
    """Everything one method call sees: the same-named tensor from every input model."""

    name: str
    base: torch.Tensor | None
    tensors: list[torch.Tensor]  # the non-base models (for linear: every listed model)
    model_params: list[dict[str, float]]  # resolved per-model parameters, aligned with `tensors`
    params: dict[str, Any]  # resolved global parameters
    generators: list[torch.Generator] = field(default_factory=list)  # one per tensor, for random methods


MethodFn = Callable[[TensorGroup], torch.Tensor]
Bounds = dict[str, tuple[float, float]]  # parameter -> closed [low, high] every value must lie in
# Given a parameter name, every number it can take for one merged model (its own setting, else the global
# one, else the default); returns what is wrong with the combination, or None.
EntryCheck = Callable[[Callable[[str], list[float]]], str | None]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    needs_base: bool
    model_params: dict[str, float | None]  # name -> default (None: required)
    global_params: dict[str, Any]  # name -> default
    random: bool = False
    bounds: Bounds = field(default_factory=dict)
    check: EntryCheck | None = None


METHODS: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    needs_base: bool,
    model_params: dict[str, float | None],
    global_params: dict[str, Any],
    random: bool = False,
    bounds: Bounds | None = None,
    check: EntryCheck | None = None,
) -> Callable[[MethodFn], MethodFn]:
    def wrap(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(
            name, fn, needs_base, model_params, global_params, random, bounds or {}, check
        )
        return fn

    return wrap
