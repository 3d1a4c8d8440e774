"""The dry run of a merge: a recipe checked like a submission, answered with its per-tensor parameters."""

from __future__ import annotations

import math
from typing import Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, Field

from service.prechecks import PRECHECKS, resolve_or_422
from service.schemas import MergeJobRequest
from workers.merge.executor import tensor_parameters
from workers.merge.plan import plan_merge
from workers.merge.registry import METHODS
from workers.settings import Settings
from workers.store.registry import Registry


class ModelParameters(BaseModel):
    model: str
    parameters: dict[str, Any]


class TensorParameters(BaseModel):
    name: str
    shape: list[int]
    dtype: str
    layer_position: float = Field(description="t in [0, 1]: where the tensor's layer sits (0 outside layers)")
    merged: bool = Field(description="False: not floating point, copied from the reference model")
    models: list[ModelParameters] = Field(description="Resolved parameters of each merged model")
    parameters: dict[str, Any] = Field(description="Resolved global parameters")


class MergePlan(BaseModel):
    """A recipe that would be accepted by POST /v1/merges, resolved tensor by tensor; nothing is queued."""

    valid: Literal[True] = True
    merge_method: str
    base_model: str | None
    reference_model: str = Field(description="Whose config, layout and tokenizer the output follows")
    input_models: list[str]
    name: str | None = Field(description="The output id (derived from the job id at submission when unset)")
    num_tensors: int
    tensors: list[TensorParameters]


def dry_run(request: MergeJobRequest, registry: Registry, settings: Settings) -> MergePlan:
    """The submission's prechecks (4xx on failure), then the resolved parameters of every tensor."""
    PRECHECKS[request.kind](request, registry, settings)
    paths = {ref: resolve_or_422(ref, registry, settings) for ref in request.input_models}
    plan = plan_merge(request, paths)
    method = METHODS[request.merge_method]
    tensors = []
    for planned in plan.tensors:
        merged = planned.entry.dtype.is_floating_point
        models: list[ModelParameters] = []
        params: dict[str, Any] = {}
        if merged:
            model_params, params = tensor_parameters(request, method, planned)
            models = [
                ModelParameters(model=source.model, parameters=values)
                for source, values in zip(planned.slice.merged, model_params, strict=True)
            ]
        for owner, values in [*((m.model, m.parameters) for m in models), ("global", params)]:
            for key, value in values.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise HTTPException(422, f"{key} is {value} for {owner} at tensor {planned.name!r}")
        tensors.append(
            TensorParameters(
                name=planned.name,
                shape=list(planned.entry.shape),
                dtype=str(planned.entry.dtype).removeprefix("torch."),
                layer_position=round(planned.t, 6),
                merged=merged,
                models=models,
                parameters=params,
            )
        )
    return MergePlan(
        merge_method=request.merge_method,
        base_model=request.base_model,
        reference_model=request.reference_model,
        input_models=request.input_models,
        name=request.name,
        num_tensors=len(tensors),
        tensors=tensors,
    )
