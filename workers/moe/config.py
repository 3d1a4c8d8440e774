"""The MoE recipe: mergekit-moe's YAML schema (`base_model`, `experts`, `gate_mode`, ...), plus Strata's
`name` and `seed`. Validation that needs no model files lives here; the output architecture is chosen
from the models' configs (`workers.moe.layouts`)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.merge.config import MODEL_ID, DType, MergeConfigError, parse_yaml

GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"]
RANDOM_MODES = ("random", "uniform_random")
Prompt = Annotated[str, Field(min_length=1, max_length=8192)]
Prompts = Annotated[list[Prompt], Field(max_length=256)]
MOE_KEYS = frozenset({"experts", "gate_mode", "experts_per_token", "shared_experts"})


def _bounded(name: str, value: float | None, low: float, high: float) -> float | None:
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value}")
    return value


class Expert(BaseModel):
    """A dense model whose MLPs become one expert of every layer; its prompts set the router rows."""

    model_config = ConfigDict(extra="forbid")
    source_model: str = Field(
        min_length=1, description="A registered model id, or a directory under an import root"
    )
    positive_prompts: Prompts | None = None
    negative_prompts: Prompts | None = None
    noise_scale: float | None = Field(
        default=None, description="Gaussian noise of this std added to its MLP weights"
    )
    residual_scale: float | None = Field(default=None, description="Factor on its down projections")

    @field_validator("noise_scale")
    @classmethod
    def _noise(cls, v: float | None) -> float | None:
        return _bounded("noise_scale", v, 0.0, 10.0)

    @field_validator("residual_scale")
    @classmethod
    def _residual(cls, v: float | None) -> float | None:
        return _bounded("residual_scale", v, -100.0, 100.0)

    def prompts_key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoeConfig(BaseModel):
    """A mergekit-moe recipe. Paste the YAML as it is; add `name` and `seed` if you like."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(
        min_length=1, description="Source of every non-MLP tensor, and of the router states"
    )
    experts: list[Expert] = Field(min_length=1, max_length=64)
    gate_mode: GateMode = Field(
        default="hidden",
        description="hidden: last-token hidden states of the prompts at each layer's input (the base in "
        "bfloat16, as mergekit); hidden_avg: their mean over the sequence; cheap_embed: mean token "
        "embedding, the same for every layer; random / uniform_random: seeded random routers",
    )
    experts_per_token: int = Field(default=2, ge=1, le=64)
    shared_experts: list[Expert] | None = Field(default=None, max_length=1)
    dtype: DType | None = None
    architecture: Literal["mixtral", "qwen"] | None = Field(
        default=None, description="Output architecture (default: Mixtral when possible, else Qwen2-MoE)"
    )
    name: str | None = Field(default=None, description="Id of the output model (default: derived)")
    seed: int = Field(default=0, ge=0, lt=2**63, description="Seed of the random gate modes and noise_scale")

    @field_validator("architecture", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v  # mergekit matches the name case-insensitively

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_ID.match(v):
            raise ValueError(
                f"name {v!r} is not a valid model id (letters, digits, '.', '_', '-'; at most 128)"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> MoeConfig:
        if len(self.experts) < self.experts_per_token:
            raise ValueError(
                f"experts_per_token is {self.experts_per_token}, "
                f"but there are only {len(self.experts)} experts"
            )
        shared = self.shared_experts or []
        if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
            raise ValueError("give prompts for every shared expert or for none")
        if self.gate_mode not in RANDOM_MODES:
            for index, expert in enumerate(self.experts):
                if not expert.positive_prompts:
                    raise ValueError(f"expert {index} ({expert.source_model}) has no positive_prompts")
            if len(self.experts) < 2:
                raise ValueError(f"gate_mode {self.gate_mode} needs at least two experts to route between")
            first = self.experts[0].prompts_key()
            if all(e.prompts_key() == first for e in self.experts[1:]):
                raise ValueError(
                    "the experts' prompts are all the same, so the router could not tell them apart; give "
                    "each expert positive_prompts that show what should be routed to it"
                )
            if len({e.source_model for e in self.experts}) == 1:
                raise ValueError("all experts are the same model: the MoE would compute what that model does")
        return self

    @property
    def input_models(self) -> list[str]:
        """Every referenced model, base first, without duplicates."""
        refs = [self.base_model] + [e.source_model for e in self.experts + (self.shared_experts or [])]
        return list(dict.fromkeys(refs))

    @property
    def gated_experts(self) -> list[Expert]:
        """The experts that get router rows: the routed ones, then shared ones with prompts (or random)."""
        shared = self.shared_experts or []
        if shared and (shared[0].positive_prompts or self.gate_mode in RANDOM_MODES):
            return self.experts + shared
        return list(self.experts)


def is_moe_recipe(data: dict) -> bool:
    """A mergekit-moe config (rather than a mergekit-yaml one), recognised by its keys."""
    return "merge_method" not in data and bool(MOE_KEYS & set(data))


def load_moe_config(text: str | bytes) -> MoeConfig:
    """Parse and validate a mergekit-moe YAML; MergeConfigError with a one-line reason (the first error)."""
    try:
        return MoeConfig.model_validate(parse_yaml(text))
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        where = ".".join(str(part) for part in errors[0]["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = errors[0]["msg"]
        raise MergeConfigError(f"{where}: {message}{more}" if where else message + more) from e
