"""Per-request merge recipes as coefficients of deltas over one base (workers.composition)."""

from __future__ import annotations

import pytest

from workers.composition import MAX_TERMS, CompositionError, parse, terms

BASES = {"v1": "base", "v2": "base", "base": None, "w1": "other"}


def recipe(method: str = "linear", **extra) -> dict:
    models = extra.pop(
        "models", [{"model": "v1", "parameters": {"weight": 1}}, {"model": "v2", "parameters": {"weight": 3}}]
    )
    return {"merge_method": method, "models": models, **extra}


def test_linear_weights_are_normalised_and_the_base_counts_with_a_zero_delta():
    assert terms(parse(recipe()), BASES) == ("base", [("v1", 0.25), ("v2", 0.75)])
    with_base = recipe(
        models=[{"model": "v1", "parameters": {"weight": 1}}, {"model": "base", "parameters": {"weight": 1}}]
    )
    assert terms(parse(with_base), BASES) == ("base", [("v1", 0.5)])


def test_task_arithmetic_scales_by_lambda_and_needs_the_base():
    got = terms(parse(recipe("task_arithmetic", base_model="base", parameters={"lambda": 0.5})), BASES)
    assert got == ("base", [("v1", 0.5), ("v2", 1.5)])
    with pytest.raises(CompositionError, match="needs base_model"):
        terms(parse(recipe("task_arithmetic")), BASES)


@pytest.mark.parametrize(
    "body, message",
    [
        (
            recipe(
                models=[
                    {"model": "v1", "parameters": {"weight": 1}},
                    {"model": "w1", "parameters": {"weight": 1}},
                ]
            ),
            "mixes",
        ),
        (recipe("slerp", base_model="base"), "needs a merge job"),
        (recipe(models=[{"model": "v1", "parameters": {"weight": 1}}] * (MAX_TERMS + 1)), "at most"),
        (recipe(parameters={"normalize": False}), "sum to 1"),
        (recipe(base_model="other"), "mixes"),
        (recipe(models=[{"model": "v1", "parameters": {"weight": float("nan")}}]), "merge.models"),
        (recipe(models=[{"model": "v1", "parameters": {"density": 0.5, "weight": 1}}]), "only weight"),
    ],
)
def test_recipes_that_are_not_a_composition_of_one_bases_deltas_are_refused(body, message):
    with pytest.raises(CompositionError, match=message):
        terms(parse(body), BASES)
