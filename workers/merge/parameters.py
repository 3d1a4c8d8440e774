"""Evaluating mergekit parameter settings for one tensor.

- scalar: the value everywhere;
- list of numbers (gradient): for decoder layer i of n, t = i / (n - 1) (t = 1 when n == 1), and the value is
  the linear interpolation at position t * (len - 1); tensors outside the layers use t = 0; in the slices
  form, i and n count the layers of the output slice; a list holding booleans picks entry int(t * (len - 1));
- list of {filter, value}: the first entry whose filter is missing, "*", or a substring of the name wins.
Per-model settings take precedence over global ones.
"""

from __future__ import annotations

import re
from typing import Any

from workers.merge.config import ConditionalValue, ParameterValue

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_position(tensor_name: str, num_layers: int) -> float:
    """t in [0, 1]: where the tensor's decoder layer sits in the stack (0 outside the layers)."""
    match = LAYER.search(tensor_name)
    if not match:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def interpolate(values: list[float], t: float) -> float:
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate(setting: ParameterValue, tensor_name: str, t: float) -> Any:
    if isinstance(setting, ConditionalValue):
        setting = [setting]
    if isinstance(setting, bool | int | float):
        return setting
    if not setting:
        return None
    if all(isinstance(v, bool | int | float) for v in setting):
        if any(isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        return interpolate([float(v) for v in setting], t)
    for cond in setting:
        if cond.filter in (None, "*") or cond.filter in tensor_name:
            return evaluate(cond.value, tensor_name, t)
    return None


def resolve(
    name: str,
    defaults: dict[str, Any],
    *settings: dict[str, ParameterValue],
    tensor_name: str,
    t: float,
) -> Any:
    """The first setting (most specific first) that yields a value for `tensor_name`, else the default."""
    for scope in settings:
        if name in scope:
            value = evaluate(scope[name], tensor_name, t)
            if value is not None:
                return value
    return defaults.get(name)
