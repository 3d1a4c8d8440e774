"""Per-request merges of variants of one base: a mergekit-shaped recipe turned into coefficients of their
deltas, so a batch serves base + sum_i c_i D_i without materialising a weight.

With theta_i = theta_base + D_i (D = 0 for the base itself) and weights w_i:

- linear (normalize, the default):  sum_i w_i theta_i / sum_i w_i  = theta_base + sum_i (w_i / W) D_i
  (normalize: false is base + delta only when W = sum_i w_i = 1);
- task_arithmetic:  theta_base + lambda sum_i w_i D_i  (normalize: divided by W as well).

TIES and DARE are not linear in the deltas (sign election, random drops): a request naming them gets a
CompositionError pointing to a merge job. Nothing here knows about HTTP, Redis or tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

COMPOSABLE = ("linear", "task_arithmetic")
MAX_TERMS = 8


class CompositionError(ValueError):
    """A per-request merge that cannot be served as a composition of deltas over one base."""


class Term(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(min_length=1)
    parameters: dict[str, float] = Field(default_factory=dict)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    merge_method: str
    base_model: str | None = None
    models: list[Term] = Field(min_length=1)
    parameters: dict[str, float | bool] = Field(default_factory=dict)


def parse(recipe: Mapping) -> Recipe:
    try:
        parsed = Recipe.model_validate(recipe)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CompositionError(f"merge.{where}: {first['msg']}") from e
    if parsed.merge_method not in COMPOSABLE:
        raise CompositionError(
            f"per-request merges support {' and '.join(COMPOSABLE)}; {parsed.merge_method!r} needs a "
            "merge job (POST /v1/merges)"
        )
    if len(parsed.models) > MAX_TERMS:
        raise CompositionError(
            f"a per-request merge takes at most {MAX_TERMS} models, got {len(parsed.models)}"
        )
    return parsed


def terms(recipe: Recipe, bases: Mapping[str, str | None]) -> tuple[str, list[tuple[str, float]]]:
    """(the base, [(variant, c_i)]) for a parsed recipe; `bases` maps each model it names to the base it
    is stored as a delta of (None: a plain model, which is a base only of itself)."""
    base_of: dict[str, str] = {}
    for term in recipe.models:
        base = bases.get(term.model)
        base_of[term.model] = base if base is not None else term.model
    if recipe.base_model is not None:
        base_of.setdefault(recipe.base_model, bases.get(recipe.base_model) or recipe.base_model)
    found = sorted(set(base_of.values()))
    if len(found) != 1:
        raise CompositionError(f"a per-request merge must use variants of one base; this one mixes {found}")
    base = found[0]
    if recipe.base_model is not None and recipe.base_model != base:
        raise CompositionError(f"base_model {recipe.base_model!r} is not the variants' base {base!r}")
    if recipe.merge_method == "task_arithmetic" and recipe.base_model is None:
        raise CompositionError("task_arithmetic needs base_model")
    weights = []
    for term in recipe.models:
        unknown = set(term.parameters) - {"weight"}
        if unknown:
            raise CompositionError(f"{term.model!r}: per-request {recipe.merge_method} takes only weight")
        if "weight" not in term.parameters:
            raise CompositionError(f"{term.model!r} has no weight")
        weights.append(float(term.parameters["weight"]))
    total = sum(weights)
    unknown = set(recipe.parameters) - (
        {"normalize"} | ({"lambda"} if recipe.merge_method != "linear" else set())
    )
    if unknown:
        raise CompositionError(f"per-request {recipe.merge_method} does not take {sorted(unknown)}")
    if recipe.merge_method == "linear":
        normalize = bool(recipe.parameters.get("normalize", True))
        if not normalize and not math.isclose(total, 1.0, rel_tol=1e-9, abs_tol=1e-12):
            raise CompositionError(
                "linear with normalize: false is a variant of the base only if weights sum to 1"
            )
        scale = 1.0 / total if normalize else 1.0
    else:
        normalize = bool(recipe.parameters.get("normalize", False))
        scale = float(recipe.parameters.get("lambda", 1.0)) / (total if normalize else 1.0)
    if normalize and total == 0:
        raise CompositionError("the weights sum to 0")
    out: dict[str, float] = {}
    for term, weight in zip(recipe.models, weights, strict=True):
        if term.model != base:
            out[term.model] = out.get(term.model, 0.0) + weight * scale
    return base, sorted(out.items())


def name(base: str, composition: list[tuple[str, float]]) -> str:
    """A stable name for a composition (its cache key in an inference worker)."""
    digest = hashlib.sha256(json.dumps([base, composition]).encode()).hexdigest()[:16]
    return f"merge:{digest}"
