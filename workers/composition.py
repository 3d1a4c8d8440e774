"""Per-request merges of variants of one base: a mergekit-shaped recipe turned into coefficients of their
deltas, so a batch serves base + sum_i c_i D_i without materialising a weight.

With theta_i = theta_base + D_i (D = 0 for the base itself) and weights w_i:

- linear (normalize, the default):  sum_i w_i theta_i / sum_i w_i  = theta_base + sum_i (w_i / W) D_i
  (normalize: false is base + delta only when W = sum_i w_i = 1);
- task_arithmetic:  theta_base + lambda sum_i w_i D_i  (normalize: divided by W as well).

TIES and DARE (ties, dare_linear, dare_ties) are not linear in the deltas (sign election, random drops):
they become a `Computed` recipe, the merge job's recipe over the same models (same parameters, same
`seed`), which an inference worker computes once per recipe (workers.composition_merge) and caches by
`Computed.key`. Nothing here knows about HTTP, Redis or tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

LINEAR = ("linear", "task_arithmetic")
COMPUTED = ("ties", "dare_linear", "dare_ties")
COMPOSABLE = LINEAR + COMPUTED
MAX_TERMS = 8
COMPUTED_MODEL_PARAMS = {"weight", "density"}
COMPUTED_PARAMS = {"normalize", "lambda", "rescale"}


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
    seed: int = Field(default=0, ge=0, lt=2**63, description="the merge job's seed (dare_*)")


class Computed(BaseModel):
    """A TIES or DARE merge of variants of one base, as the merge job's recipe over the same models:
    served as base + (merged - base), computed once by the inference worker and cached by `key`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    merge_method: str
    base_model: str
    models: list[tuple[str, dict[str, float]]]
    parameters: dict[str, float | bool]
    seed: int

    def key(self) -> str:
        """The canonical recipe hash (the same recipe, however its JSON was ordered, the same key)."""
        body = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return "merge:" + hashlib.sha256(body.encode()).hexdigest()[:16]

    def config(self) -> dict:
        """The recipe a merge job takes (POST /v1/merges) for the same merge."""
        return {
            "merge_method": self.merge_method,
            "base_model": self.base_model,
            "models": [{"model": m, "parameters": p} for m, p in self.models],
            "parameters": self.parameters,
            "seed": self.seed,
        }

    @property
    def variants(self) -> list[str]:
        """The merged models, in order (the base itself, listed or not, is not merged)."""
        return [m for m, _ in self.models if m != self.base_model]


def parse(recipe: Mapping) -> Recipe:
    try:
        parsed = Recipe.model_validate(recipe)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CompositionError(f"merge.{where}: {first['msg']}") from e
    if parsed.merge_method not in COMPOSABLE:
        raise CompositionError(
            f"per-request merges support {', '.join(COMPOSABLE)}; {parsed.merge_method!r} needs a "
            "merge job (POST /v1/merges)"
        )
    if len(parsed.models) > MAX_TERMS:
        raise CompositionError(
            f"a per-request merge takes at most {MAX_TERMS} models, got {len(parsed.models)}"
        )
    return parsed


def terms(recipe: Recipe, bases: Mapping[str, str | None]) -> tuple[str, list[tuple[str, float]] | Computed]:
    """(the base, [(variant, c_i)]) for a parsed linear recipe, (the base, Computed) for TIES or DARE;
    `bases` maps each model it names to the base it is stored as a delta of (None: a plain model, which
    is a base only of itself)."""
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
    if recipe.merge_method != "linear" and recipe.base_model is None:
        raise CompositionError(f"{recipe.merge_method} needs base_model")
    if recipe.merge_method in COMPUTED:
        return base, computed(recipe, base)
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


def computed(recipe: Recipe, base: str) -> Computed:
    """The Computed form of a TIES or DARE recipe over `base`, its parameters checked as a merge job
    checks them (workers.merge.config: bounds, required weights)."""
    from workers.merge.config import MergeConfig  # the merge job's own validation

    for term in recipe.models:
        unknown = set(term.parameters) - COMPUTED_MODEL_PARAMS
        if unknown:
            raise CompositionError(
                f"{term.model!r}: per-request {recipe.merge_method} does not take {sorted(unknown)}"
            )
    unknown = set(recipe.parameters) - COMPUTED_PARAMS
    if unknown:
        raise CompositionError(f"per-request {recipe.merge_method} does not take {sorted(unknown)}")
    out = Computed(
        merge_method=recipe.merge_method,
        base_model=base,
        models=[(t.model, dict(sorted(t.parameters.items()))) for t in recipe.models],
        parameters=dict(sorted(recipe.parameters.items())),
        seed=recipe.seed,
    )
    if not out.variants:
        raise CompositionError("the merge names no model besides its base")
    try:
        MergeConfig.model_validate(out.config())
    except ValidationError as e:
        raise CompositionError(f"merge: {e.errors()[0]['msg']}") from e
    return out


def name(base: str, composition: list[tuple[str, float]]) -> str:
    """A stable name for a composition (its cache key in an inference worker)."""
    digest = hashlib.sha256(json.dumps([base, composition]).encode()).hexdigest()[:16]
    return f"merge:{digest}"
