"""The merge recipe: mergekit's YAML schema (the `models:` form), plus Strata's `name` and `seed`.

Only validation that needs no model files lives here; homology checks read the files
(`workers.merge.homology`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.merge.chat_templates import NAMED_TEMPLATES
from workers.merge.registry import METHODS

Scalar = bool | int | float
Gradient = list[float]


class ConditionalValue(BaseModel):
    """`{filter, value}`: applies where `filter` is missing, "*", or a substring of the tensor name."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | Gradient


ParameterValue = Scalar | Gradient | ConditionalValue | list[ConditionalValue]

DType = Literal["float32", "float16", "bfloat16"]
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="A registered model id, or a directory under an import root")
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)


def _numbers(value: ParameterValue) -> list[float]:
    """Every number a parameter setting can evaluate to (gradient endpoints, filter values)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, ConditionalValue):
        return _numbers(value.value)
    return [n for item in value for n in _numbers(item)]


class ModelTokenSource(BaseModel):
    """A token's row taken from a model's row for another token (`token`) or row index (`token_id`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str = Field(min_length=1)
    token_id: int | None = Field(default=None, ge=0, lt=1 << 31)
    token: str | None = Field(default=None, min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id and token")
        return self


class ZeroSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenEmbedding(BaseModel):
    """Where a token's embedding / LM-head row comes from: a model (its row for the token), another
    model token, or zeros; `force` uses it even for models that have the token."""

    model_config = ConfigDict(extra="forbid")
    source: ModelTokenSource | ZeroSource | str | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """mergekit's `tokenizer:` block."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(default="union", description='"base", "union", or "model:<id>"')
    tokens: dict[str, TokenEmbedding] | None = Field(default=None, max_length=4096)
    pad_to_multiple_of: int | None = Field(default=None, ge=1, le=1 << 16)


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
        default=None,
        description='"base", "union" or "model:<id>": build the output vocabulary and move embedding and '
        "LM-head rows onto it, as mergekit does (unset: copy the base's tokenizer as it is)",
    )
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = Field(
        default=None,
        max_length=65536,
        description='A Jinja chat template for the output, "chatml", or "auto" (the one most inputs have)',
    )
    name: str | None = Field(default=None, description="Id of the output model (default: derived)")
    seed: int = Field(default=0, description="Seed for the random methods (dare_*)")
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
        self._check_tokenizer()
        return self

    def _check_tokenizer(self) -> None:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give tokenizer_source or a tokenizer block, not both")
        source = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        if source is not None and source not in ("base", "union"):
            ref = source.removeprefix("model:")
            if ref not in self.input_models:
                raise ValueError(f"tokenizer source {source!r} is not one of the input models")
        for token, embedding in ((self.tokenizer.tokens or {}) if self.tokenizer else {}).items():
            source = embedding.source
            model = source.model if isinstance(source, ModelTokenSource) else source
            if isinstance(model, str) and model not in self.input_models:
                raise ValueError(f"token {token!r} takes its row from {model!r}, which is not an input model")
            if embedding.force and embedding.source is None:
                raise ValueError(f"token {token!r} is forced but has no source")
        template = self.chat_template
        named = template in NAMED_TEMPLATES or template == "auto"
        if template is not None and not named and (len(template) < 20 or "{" not in template):
            raise ValueError(
                f'chat_template must be "auto", one of {sorted(NAMED_TEMPLATES)} or a Jinja template'
            )

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


def parse_yaml(text: str | bytes) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergeConfigError(f"not valid YAML: {e}") from e
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
    try:
        return MergeConfig.model_validate(parse_yaml(text))
    except ValidationError as e:
        raise MergeConfigError(str(e)) from e
