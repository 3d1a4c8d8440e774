"""Merge methods by name. A method is a function over one group of aligned tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

BasePolicy = Literal["required", "optional", "ignored"]


@dataclass
class TensorGroup:
    """Everything one method call sees: the same-named tensor from every input model."""

    name: str
    base: torch.Tensor | None
    tensors: list[torch.Tensor]  # the non-base models (base "ignored": every input, in order)
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
    """A method and its input contract (mergekit's): what it does with a base model, how many inputs it
    takes (base included in `min_inputs`/`max_inputs`, excluded in `*_non_base`), and parameter bounds."""

    name: str
    fn: MethodFn
    needs_base: bool
    model_params: dict[str, float | None]  # name -> default (None: required)
    global_params: dict[str, Any]  # name -> default
    random: bool = False
    base: BasePolicy = "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    bounds: Bounds = field(default_factory=dict)  # closed ranges per parameter
    check: EntryCheck | None = None  # per merged input: a problem with its parameters, or None

    @property
    def uses_base(self) -> bool:
        """The base model's tensor is passed separately (and not among `tensors`)."""
        return self.base != "ignored"


METHODS: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    needs_base: bool,
    model_params: dict[str, float | None],
    global_params: dict[str, Any],
    random: bool = False,
    base: BasePolicy | None = None,
    min_inputs: int = 1,
    max_inputs: int | None = None,
    min_non_base: int = 0,
    max_non_base: int | None = None,
    bounds: Bounds | None = None,
    check: EntryCheck | None = None,
) -> Callable[[MethodFn], MethodFn]:
    policy: BasePolicy = base or ("required" if needs_base else "ignored")

    def wrap(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(
            name,
            fn,
            needs_base or policy == "required",
            model_params,
            global_params,
            random,
            policy,
            min_inputs,
            max_inputs,
            min_non_base,
            max_non_base,
            bounds or {},
            check,
        )
        return fn

    return wrap
