"""The merge recipe: mergekit's YAML schema (the `models:` form), plus Strata's `name` and `seed`.

Only validation that needs no model files lives here; homology checks read the files
(`workers.merge.homology`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from workers.merge.registry import METHODS

MAX_ABS = 1e6


def _finite(value: bool | int | float) -> bool | int | float:
    """Numbers must be finite and bounded: NaN, inf, and overflowing literals (1e400, 10**400) are refused."""
    if isinstance(value, bool):
        return value
    try:
        number = float(value)
    except OverflowError as e:
        raise ValueError(f"numbers must lie within +-{MAX_ABS:g}") from e
    if not math.isfinite(number):
        raise ValueError("numbers must be finite (no NaN, inf or overflow)")
    if abs(number) > MAX_ABS:
        raise ValueError(f"numbers must lie within +-{MAX_ABS:g}")
    return value


Scalar = bool | int | float
Gradient = list[float]


class ConditionalValue(BaseModel):
    """`{filter, value}`: applies where `filter` is missing, "*", or a substring of the tensor name."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | Gradient


def _all_finite(value: object) -> object:
    for number in _numbers(value):
        _finite(number)
    return value


ParameterValue = Annotated[
    Scalar | Gradient | ConditionalValue | list[ConditionalValue], AfterValidator(_all_finite)
]

DType = Literal["float32", "float16", "bfloat16"]
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="A registered model id, or a directory under an import root")
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)


def _numbers(value: object) -> list[int | float]:
    """Every number a parameter setting can evaluate to (gradient endpoints, filter values)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [value]
    if isinstance(value, ConditionalValue):
        return _numbers(value.value)
    return [n for item in value for n in _numbers(item)]


class MergeConfig(BaseModel):
    """A merge recipe. Paste a mergekit YAML (models form) as it is; add `name` and `seed` if you like."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] = Field(min_length=1)
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: str | None = Field(
        default=None, description='"base" (default) or one of the input models'
    )
    name: str | None = Field(default=None, description="Id of the output model (default: derived)")
    seed: int = Field(default=0, ge=-(2**63), lt=2**64, description="Seed for the random methods (dare_*)")
    tie_break: Literal["mergekit", "first"] = Field(
        default="mergekit",
        description="ties trim, among entries equal to the k-th largest |delta|: the ones mergekit 0.1.5 "
        "keeps on the CPU (bit-identical output), or the first in flat order (a stable sort's choice, a "
        "little faster)",
    )

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown merge_method {v!r}; choose one of {sorted(METHODS)}")
        return v

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_ID.match(v):
            raise ValueError(
                f"name {v!r} is not a valid model id (letters, digits, '.', '_', '-'; at most 128)"
            )
        return v

    @model_validator(mode="after")
    def _check_parameters(self) -> MergeConfig:
        method = METHODS[self.merge_method]
        if method.needs_base and not self.base_model:
            raise ValueError(f"{self.merge_method} needs a base_model")
        if not method.needs_base and self.base_model and self.base_model not in self.input_models:
            raise ValueError(
                f"{self.merge_method} merges the listed models only: list base_model "
                f"{self.base_model!r} under models with a weight, or drop it"
            )
        for key in self.parameters:
            if key not in method.global_params and key not in method.model_params:
                raise ValueError(f"unknown parameter {key!r} for {self.merge_method}")
        for entry in self.models:
            for key in entry.parameters:
                if key not in method.model_params and key not in method.global_params:
                    raise ValueError(
                        f"unknown parameter {key!r} for {self.merge_method} (model {entry.model})"
                    )
        for entry in self.merged_entries:
            for key, default in method.model_params.items():
                if default is None and key not in entry.parameters and key not in self.parameters:
                    raise ValueError(f"model {entry.model!r} needs parameter {key!r} for {self.merge_method}")
            density = entry.parameters.get("density", self.parameters.get("density"))
            if density is not None:
                bad = [d for d in _numbers(density) if not 0 < d <= 1]
                if bad:
                    raise ValueError(f"density must be in (0, 1], got {bad[0]} for model {entry.model!r}")
        if self.tokenizer_source not in (None, "base") and self.tokenizer_source not in self.input_models:
            raise ValueError(f"tokenizer_source {self.tokenizer_source!r} is not one of the input models")
        return self

    @property
    def input_models(self) -> list[str]:
        """Every referenced model, base first, without duplicates."""
        refs = ([self.base_model] if self.base_model else []) + [m.model for m in self.models]
        return list(dict.fromkeys(refs))

    @property
    def merged_entries(self) -> list[InputModel]:
        """The models whose tensors the method combines (the base is separate for task-vector methods)."""
        if METHODS[self.merge_method].needs_base:
            return [m for m in self.models if m.model != self.base_model]
        return list(self.models)

    @property
    def reference_model(self) -> str:
        """The model whose config, tensor layout and tokenizer the output follows."""
        return self.base_model or self.models[0].model


class MergeConfigError(ValueError):
    """A merge recipe that cannot be parsed or validated."""


MAX_NODES = 200_000


def _check_size(data: object, budget: int = MAX_NODES) -> None:
    """Count the values of a parsed document as they expand (aliases count each time they are used), and
    stop at `budget`: a YAML bomb of nested aliases is refused in milliseconds, not expanded."""
    stack = [data]
    seen = 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > budget:
            raise MergeConfigError(f"the document expands to more than {budget} values (YAML aliases?)")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_yaml(text: str | bytes) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:  # one line, and no quote of the document
        problem = getattr(e, "problem", None) or "cannot be parsed"
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise MergeConfigError(f"not valid YAML: {problem}{where}") from e
    except RecursionError as e:
        raise MergeConfigError("not valid YAML: nested too deeply") from e
    _check_size(data)
    if not isinstance(data, dict):
        raise MergeConfigError("a merge config must be a YAML mapping")
    if "slices" in data or "modules" in data:
        raise MergeConfigError("mergekit 'slices'/'modules' configs are not supported; use the 'models' form")
    return data


def parse_json(text: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeConfigError(f"not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise MergeConfigError("a merge config must be a JSON object")
    return data


def load_merge_config(text: str | bytes) -> MergeConfig:
    """Parse and validate a recipe; MergeConfigError with a one-line reason (the first error)."""
    try:
        return MergeConfig.model_validate(parse_yaml(text))
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise MergeConfigError(f"{where}: {first['msg']}{more}" if where else first["msg"] + more) from e
