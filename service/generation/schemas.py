"""Bodies of /v1/generate and the OpenAI-compatible /v1/completions and /v1/chat/completions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator


class TextPart(BaseModel):
    """An OpenAI content part; these models read text only (an image part is a 422, not silently dropped)."""

    type: Literal["text"]
    text: StrictStr  # a number, null or a list is a 422, never coerced or a 500


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart] = Field(description="Text, or OpenAI content parts of type text")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class DepthOptions(BaseModel):
    """Strata's dynamic-depth controls (extra body fields for OpenAI clients)."""

    model_config = ConfigDict(allow_inf_nan=False)

    latency_budget_ms: float | None = Field(default=None, gt=0, description="Deepest exit predicted to fit")
    min_depth: int | None = Field(default=None, ge=1, description="Never exit shallower than this")
    exits: list[int] | None = Field(default=None, min_length=1, description="Allowed exit depths")
    depth: int | None = Field(default=None, ge=1, description="Explicit depth (overrides the budget)")
    on_infeasible: Literal["best_effort", "reject"] = Field(
        default="best_effort",
        description="No exit fits: use the shallowest allowed (meeting the quality floor), or answer 422",
    )
    max_perplexity_ratio: float | None = Field(
        default=None,
        ge=1,
        le=1e12,
        allow_inf_nan=False,
        description="Quality floor: the exit's profiled held-out perplexity over full depth's at most this",
    )
    min_top1_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Quality floor: the exit's profiled top-1 agreement with full depth at least this",
    )
    exit_adapter: bool = Field(
        default=True, description="Apply the model's exit adapter at the chosen exit (when it has one)"
    )

    @field_validator("exits")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(k < 1 for k in v):
            raise ValueError("exits must be positive layer counts")
        return v


class SamplingOptions(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    temperature: float = Field(default=0.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="0: no top-k cut")
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings")

    @field_validator("temperature")
    @classmethod
    def _not_vanishing(cls, v: float) -> float:
        if 0 < v < 0.01:  # logits / t would overflow to inf
            raise ValueError("temperature must be 0 (greedy) or at least 0.01")
        return v

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop takes at most 4 non-empty strings")
        if v == "":
            raise ValueError("stop must not be empty")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class SpeculativeOptions(BaseModel):
    """Self-speculative greedy decoding: draft m tokens with the first k layers, verify with the full model
    (reusing the first k layers' KV cache). The output equals full-depth greedy output exactly."""

    model_config = ConfigDict(extra="forbid")
    draft_depth: int = Field(ge=1, description="k: the exit that drafts")
    num_draft_tokens: int = Field(default=4, ge=1, le=32, description="m: tokens drafted per verification")


class StreamingOptions(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    stream: bool = False
    stream_interval_ms: float | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Streaming: tokens made within this many ms of the last chunk come together in the next "
        "one (the first token comes at once); 0: every token in a chunk of its own. Default: "
        "STRATA_STREAM_INTERVAL_MS",
    )


class MergeOptions(BaseModel):
    merge: dict[str, Any] | None = Field(
        default=None,
        description="A per-request merge of variants of one base, mergekit-shaped (merge_method linear, "
        "task_arithmetic, ties, dare_linear or dare_ties; base_model; models with parameters weight and, "
        "for ties/dare, density; seed for dare): linear ones served as the base plus the weighted sum of "
        "their deltas, nothing materialised; ties/dare computed once per recipe (as a merge job with the "
        "same recipe would) and cached",
    )


class GenerateRequest(DepthOptions, SamplingOptions, StreamingOptions, MergeOptions):
    model_config = ConfigDict(extra="forbid")
    speculative: SpeculativeOptions | None = None
    model: str | None = Field(default=None, description="The model; may be left out when `merge` is given")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    max_new_tokens: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.model is None and self.merge is None:
            raise ValueError("give model (or merge)")
        return self


class SpeculativeStats(BaseModel):
    draft_depth: int
    num_draft_tokens: int
    drafted: int = Field(description="Tokens the draft exit proposed")
    accepted: int = Field(description="Drafted tokens the full model confirmed")
    acceptance_rate: float = Field(description="accepted / drafted")
    iterations: int = Field(description="Full-depth verification passes")


class ExitQualityInfo(BaseModel):
    perplexity: float = Field(description="Profiled held-out perplexity of the exit as served")
    perplexity_ratio: float = Field(description="That perplexity over the full model's")
    top1_agreement: float = Field(description="Profiled fraction of next tokens equal to the full model's")
    exit_adapter: bool = Field(description="Whether the exit's adapter is applied")
    eval_text: str | None = Field(
        default=None, description="The model's evaluation text these figures (and quality floors) are on"
    )


class StrataInfo(BaseModel):
    depth: int = Field(description="Decoder layers the answer was computed with")
    num_layers: int
    quality: ExitQualityInfo | None = Field(
        default=None, description="The chosen exit's profile quality (null before the model is profiled)"
    )
    latency_model: Literal["profile", "default"] | None = Field(
        default=None,
        description="default: the model's profile is not ready yet (it is being measured in the background), "
        "so a conservative default latency model chose the depth",
    )
    predicted_ms: float | None = Field(description="Predicted latency at the chosen depth (queue + compute)")
    elapsed_ms: float = Field(description="From the request's arrival to its last token")
    budget_met: bool | None = Field(description="elapsed_ms <= latency_budget_ms (null without a budget)")
    latency_budget_ms: float | None = None
    queue_ms: float | None = Field(default=None, description="Time waiting for an inference worker")
    batch_size: int | None = Field(default=None, description="Requests generated together with this one")
    speculative: SpeculativeStats | None = Field(
        default=None, description="Draft statistics when the request asked for self-speculative decoding"
    )
    precision: str | None = Field(default=None, description="Weight precision of the engine that answered")
    exit_adapter: bool | None = Field(default=None, description="Whether the exit adapter was applied")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    strata: StrataInfo


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIRequest(DepthOptions, SamplingOptions, StreamingOptions, MergeOptions):
    """Fields shared by the OpenAI endpoints; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=1, description="Only n = 1 is supported")
    stream_options: StreamOptions | None = None

    def new_tokens(self, default: int = 64) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _single(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("only a single prompt per request is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    strata: StrataInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    strata: StrataInfo
