"""The merge recipe: mergekit's YAML schema (`models:` or `slices:` form), plus Strata's `name` and `seed`.

Only validation that needs no model files lives here; homology checks read the files
(`workers.merge.homology`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
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

from workers.merge.chat_templates import NAMED_TEMPLATES
from workers.merge.registry import METHODS, MergeMethod

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


MAX_LAYER = 100_000


class InputSlice(BaseModel):
    """One source of an output slice: layers [start, end) of a model (half-open, as in mergekit)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="A registered model id, or a directory under an import root")
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        start, end = v
        if not 0 <= start < end <= MAX_LAYER:
            raise ValueError(f"layer_range [{start}, {end}) must satisfy 0 <= start < end")
        return v


class OutputSlice(BaseModel):
    """A run of output layers merged from `sources` (each the same number of layers)."""

    model_config = ConfigDict(extra="forbid")
    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """A normalized input of one output slice; `layer_range` None means the whole model (models form)."""

    model: str
    layer_range: tuple[int, int] | None
    parameters: dict[str, ParameterValue]


@dataclass(frozen=True)
class SliceSpec:
    """A normalized output slice: its inputs in mergekit's order, its base (if the method takes one and
    it is among the inputs), and its own parameter settings."""

    sources: tuple[SliceSource, ...]
    base: str | None
    parameters: dict[str, ParameterValue]

    @property
    def merged(self) -> list[SliceSource]:
        """The inputs the method combines, in order: every input but the base (all of them when the
        method ignores bases: `base` is then None)."""
        return [s for s in self.sources if s.model != self.base]


def _numbers(value: object) -> list[int | float]:
    """Every number a parameter setting can evaluate to (gradient endpoints, filter values)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [value]
    if isinstance(value, ConditionalValue):
        return _numbers(value.value)
    return [n for item in value for n in _numbers(item)]


def _scalars(value: ParameterValue) -> list[bool | int | float]:
    """Every scalar a parameter setting holds (booleans included)."""
    if isinstance(value, bool | int | float):
        return [value]
    if isinstance(value, ConditionalValue):
        return _scalars(value.value)
    return [n for item in value for n in _scalars(item)]


def _check_values(method: MergeMethod, key: str, value: ParameterValue, where: str) -> None:
    """Numbers finite and within the method's bounds; booleans (or 0/1) where the default is a boolean."""
    default = method.model_params.get(key, method.global_params.get(key))
    for scalar in _scalars(value):
        as_flag = isinstance(scalar, bool) or (isinstance(default, bool) and scalar in (0, 1))
        if isinstance(default, bool) != as_flag:
            want = "true or false" if isinstance(default, bool) else "a number"
            raise ValueError(f"parameter {key!r} must be {want}{where}")
    numbers = _numbers(value)
    if not all(math.isfinite(n) for n in numbers):
        raise ValueError(f"parameter {key!r} must be finite{where}")
    if isinstance(default, int) and not isinstance(default, bool):
        if not all(float(n).is_integer() for n in numbers):
            raise ValueError(f"parameter {key!r} must be an integer{where}")
    if key == "density" and not all(0 < d <= 1 for d in numbers):
        bad = next(d for d in numbers if not 0 < d <= 1)
        raise ValueError(f"density must be in (0, 1], got {bad}{where}")
    if key in method.bounds:
        low, high = method.bounds[key]
        bad = [n for n in numbers if not low <= n <= high]
        if bad:
            raise ValueError(f"{key} must be in [{low:g}, {high:g}], got {bad[0]:g}{where}")


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
    """A merge recipe. Paste a mergekit YAML (models or slices form) as it is; add `name` and `seed`."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = Field(default=None, min_length=1)
    slices: list[OutputSlice] | None = Field(
        default=None,
        min_length=1,
        description="mergekit's slices form: output layers stacked from [start, end) ranges of the sources",
    )
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
    seed: int = Field(default=0, ge=-(2**63), lt=2**64, description="Seed for the random methods (dare_*)")
    delta_error_budget: float | None = Field(
        default=0.05,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="With a registered base_model: the merge is stored as that base + a delta compressed "
        "per tensor within this relative error (served over the resident base, as the variants job's "
        "variants); null: a plain model",
    )
    keep_full_weights: bool = Field(
        default=True,
        description="With the merge stored as a delta: keep its full weights too (the default: the files "
        "stay bit-equal to mergekit's; false keeps the delta alone, materialised as base + delta where read)",
    )
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
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        method = METHODS[self.merge_method]
        if self.models is not None and method.base == "required" and not self.base_model:
            raise ValueError(f"{self.merge_method} needs a base_model")
        if (
            self.models is not None
            and method.base == "ignored"
            and self.base_model
            and self.base_model not in self.input_models[1:]
            and any(default is None for default in method.model_params.values())
        ):
            raise ValueError(
                f"{self.merge_method} merges the listed models only: list base_model "
                f"{self.base_model!r} under models with a weight, or drop it"
            )
        known = {**method.global_params, **method.model_params}
        settings = [(self.parameters, "")]
        for i, spec in enumerate(self.slices or []):
            settings.append((spec.parameters, f" (slice {i})"))
            settings += [(s.parameters, f" (slice {i}, model {s.model})") for s in spec.sources]
        settings += [(m.parameters, f" (model {m.model})") for m in self.models or []]
        for scope, where in settings:
            for key, value in scope.items():
                if key not in known:
                    raise ValueError(f"unknown parameter {key!r} for {self.merge_method}{where}")
                _check_values(method, key, value, where)
        for i, spec in enumerate(self.slice_specs):
            self._check_slice(method, i, spec)
        if method.check is not None:
            for spec in self.slice_specs:
                for source in spec.merged:
                    problem = method.check(self._setting_numbers(method, source.parameters, spec.parameters))
                    if problem:
                        raise ValueError(f"{problem} for model {source.model!r}")
        self._check_tokenizer()
        return self

    def _check_slice(self, method: MergeMethod, index: int, spec: SliceSpec) -> None:
        """mergekit's input contract for one output slice, and every required parameter present."""
        where = f" (slice {index})" if self.slices is not None else ""
        refs = [s.model for s in spec.sources]
        if len(set(refs)) != len(refs):
            raise ValueError(f"a model is listed twice{where}; each input may appear once per slice")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in spec.sources if s.layer_range}
        if len(lengths) > 1:
            raise ValueError(f"every source of a slice needs the same number of layers{where}")
        slice_base = (self.slices[index].base_model if self.slices else None) or self.base_model
        if method.base != "ignored" and slice_base and slice_base not in refs:
            raise ValueError(f"base model {slice_base!r} is not among the sources{where}")
        if method.base == "required" and spec.base is None:
            raise ValueError(f"{self.merge_method} needs a base model among the sources{where}")
        non_base = len(spec.merged)
        for what, count, low, high in (
            ("(base included)", len(refs), method.min_inputs, method.max_inputs),
            ("besides the base", non_base, method.min_non_base, method.max_non_base),
        ):
            if count < low or (high is not None and count > high):
                if low == high:
                    want = f"exactly {low} model" + ("" if low == 1 else "s")
                else:
                    want = f"at least {low} models" if high is None else f"{low} to {high} models"
                raise ValueError(f"{self.merge_method} takes {want} {what}, got {count}{where}")
        for key, default in method.global_params.items():
            if default is None and not any(key in p for p in (spec.parameters, self.parameters)):
                raise ValueError(f"{self.merge_method} needs parameter {key!r}{where}")
        for source in spec.merged:
            for key, default in method.model_params.items():
                if default is None and not any(key in p for p in self._settings(spec, source)):
                    raise ValueError(
                        f"model {source.model!r} needs parameter {key!r} for {self.merge_method}{where}"
                    )

    def _settings(self, spec: SliceSpec, source: SliceSource) -> list[dict[str, ParameterValue]]:
        return [source.parameters, spec.parameters, self.parameters]

    def _setting_numbers(self, method: MergeMethod, *scopes: dict[str, ParameterValue]):
        """A parameter's numbers as one merged input sees them: its own setting, then its slice's, then the
        global one, then the method's default."""

        def numbers(key: str) -> list[float]:
            for scope in (*scopes, self.parameters):
                if key in scope:
                    return _numbers(scope[key])
            default = {**method.global_params, **method.model_params}.get(key)
            return [] if default is None else _numbers(default)

        return numbers

    @property
    def slice_specs(self) -> list[SliceSpec]:
        """Both forms as mergekit normalizes them: the models form is one slice over whole models, with
        the base model appended when it is not listed."""
        method = METHODS[self.merge_method]
        if self.slices is None:
            sources = [SliceSource(m.model, None, m.parameters) for m in self.models or []]
            if self.base_model and self.base_model not in [s.model for s in sources]:
                sources.append(SliceSource(self.base_model, None, {}))
            return [SliceSpec(tuple(sources), self._base_of(method, sources, self.base_model), {})]
        specs = []
        for out in self.slices:
            sources = [SliceSource(s.model, s.layer_range, s.parameters) for s in out.sources]
            base = self._base_of(method, sources, out.base_model or self.base_model)
            specs.append(SliceSpec(tuple(sources), base, out.parameters))
        return specs

    @staticmethod
    def _base_of(method: MergeMethod, sources: list[SliceSource], base: str | None) -> str | None:
        if method.base == "ignored" or base not in [s.model for s in sources]:
            return None
        return base

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
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models or []]
        for out in self.slices or []:
            refs += ([out.base_model] if out.base_model else []) + [s.model for s in out.sources]
        return list(dict.fromkeys(refs))

    @property
    def merged_entries(self) -> list[InputModel]:
        """The models whose tensors the method combines (the base is separate for task-vector methods)."""
        if METHODS[self.merge_method].uses_base:
            return [m for m in self.models or [] if m.model != self.base_model]
        return list(self.models or [])

    @property
    def reference_model(self) -> str:
        """The model whose config, tensor layout and tokenizer the output follows."""
        if self.base_model:
            return self.base_model
        return self.models[0].model if self.models else self.slices[0].sources[0].model


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
    if "modules" in data:
        raise MergeConfigError("mergekit 'modules' configs are not supported; use 'models' or 'slices'")
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
