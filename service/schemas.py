"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.eval_texts import EvalTextSpec
from workers.distill.pipeline import DistillOptions
from workers.distill.records import TaskSpec
from workers.early_exit.fit_data import DEFAULT_MAX_TOKENS, DEFAULT_TEXT, BundledText
from workers.merge.config import MODEL_ID, MergeConfig
from workers.moe.config import MoeConfig
from workers.prune.shear import MaskOptions
from workers.prune.target import SIZE_FIELDS, sizes_given
from workers.store.registry import ModelRecord
from workers.train.finetune import FinetuneConfig

# Seeds reach torch generators (64-bit) after small offsets: bounded so no job fails on one.
Seed = Annotated[int, Field(ge=0, lt=2**62, description="Random seed, 0 <= seed < 2^62")]


def _slug(v: str | None) -> str | None:
    if v is not None and not MODEL_ID.match(v):
        raise ValueError(f"{v!r} is not a valid model id (letters, digits, '.', '_', '-'; at most 128)")
    return v


class MergeJobRequest(MergeConfig):
    """A merge: mergekit's YAML schema (models or slices form) as JSON, plus `name` and `seed`."""

    kind: Literal["merge"] = "merge"


class MoeJobRequest(MoeConfig):
    """A mixture of experts from dense models: mergekit-moe's YAML schema as JSON, plus `name` and `seed`."""

    kind: Literal["moe"] = "moe"


class VariantsJobRequest(BaseModel):
    """Fine-tune-like variants `<prefix>-1..count`: theta + delta, rms(delta) = scale * rms(theta). The
    deltas are random noise (nothing learned), for synthetic tests of merging and serving; real variants
    come from `finetune`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["variants"]
    base: str = Field(min_length=1)
    count: int = Field(default=2, ge=1, le=16)
    scale: float = Field(default=1e-3, gt=0, le=1)
    rank: int | None = Field(default=None, ge=1, description="Low-rank deltas of this rank (dense if unset)")
    delta_error_budget: float | None = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="Store each variant as the base + a delta compressed per tensor (low rank, sparse, int8 "
        "or dense) within this relative error, served over the resident base; null: a plain copy",
    )
    keep_full_weights: bool = Field(
        default=False,
        description="Keep each variant's full weights in the store beside its delta (default: the store "
        "keeps the delta alone; jobs, downloads via `materialise`, and merges read base + delta)",
    )
    seed: Seed = 0
    prefix: str | None = None

    _check_prefix = field_validator("prefix")(_slug)

    @property
    def output_ids(self) -> list[str]:
        return [f"{self.prefix}-{i + 1}" for i in range(self.count)]


class ProfileJobRequest(BaseModel):
    """Measure per-depth latency (prefill and decode) and quality (perplexity, top-1 agreement) on the
    worker's hardware; stored with the model and used to pick depths for latency budgets."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["profile"]
    model: str = Field(min_length=1)
    grid: list[int] | None = Field(default=None, description="Exit depths (default every 2 layers + full)")
    repeats: int = Field(default=2, ge=1, le=10)
    if_unprofiled: bool = Field(default=False, description="Do nothing when the model has a profile already")
    eval_text: EvalTextSpec | None = Field(
        default=None,
        description="The text quality is measured on and floors then read (default: the model's designated "
        "text, else the broad held-out); the broad held-out is measured too",
    )


class SparsifyJobRequest(BaseModel):
    """DARE (drop each delta entry with probability 1 - density, survivors x 1/density) or magnitude (keep
    the top `density` of |delta| per tensor) applied to model - base; reports delta statistics and held-out
    perplexity before and after."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["sparsify"]
    model: str = Field(min_length=1, description="The fine-tuned model")
    base: str = Field(min_length=1, description="The model it was fine-tuned from")
    method: Literal["dare", "magnitude"] = "dare"
    density: float = Field(default=0.1, gt=0, le=1, description="Fraction of delta entries kept")
    seed: Seed = 0
    evaluate: bool = Field(default=True, description="Held-out perplexity before and after")
    name: str | None = None

    _check_name = field_validator("name")(_slug)


class PruneTargetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    num_hidden_layers: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=1)
    num_key_value_heads: int | None = Field(default=None, ge=1, description="Query heads follow their group")
    param_budget: int | None = Field(default=None, ge=1, description="Parameters the planner must fit")
    hidden_size: int | None = Field(
        default=None, ge=1, description="mode learned: the hidden dimension (embeddings, norms, head with it)"
    )
    num_attention_heads: int | None = Field(
        default=None, ge=1, description="mode learned: query heads (a multiple of num_key_value_heads)"
    )
    target_model: str | None = Field(
        default=None,
        min_length=1,
        description="mode learned: a registered model whose config gives the shape",
    )
    axes: list[Literal["depth", "mlp", "kv"]] = Field(
        default=["mlp", "kv"], min_length=1, description="What a param_budget may shrink"
    )

    @model_validator(mode="after")
    def _something(self) -> PruneTargetRequest:
        if self.target_model is not None and sizes_given(self):
            raise ValueError("give target_model or sizes, not both")
        if self.target_model is None and not sizes_given(self):
            raise ValueError(f"give one of {', '.join(SIZE_FIELDS)}, target_model")
        return self


class DomainRequest(BaseModel):
    """A data domain for healing: a bundled text by name, or a JSONL file under an import root."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
    path: str | None = Field(
        default=None, min_length=1, max_length=4096, description="JSONL under an import root"
    )
    weight: float = Field(default=1.0, gt=0, le=1e6, description="Initial sampling weight (normalised)")


class HealOptions(BaseModel):
    """Knowledge-distillation healing: (1-a) CE + a t^2 KL(teacher || student), a decaying linearly to 0."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(default=30, ge=1, le=100_000)
    lr: float = Field(default=3e-5, gt=0, le=1)
    alpha0: float = Field(default=1.0, ge=0, le=1)
    temperature: float = Field(default=2.0, gt=0, le=100)
    data: Literal["calibration", "instructions"] = Field(
        default="calibration",
        description="calibration: the pruning calibration text; instructions: the bundled instruction set "
        "(workers/data/sft.jsonl, chat template applied), about 20x more tokens",
    )
    domains: list[DomainRequest | str] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Heal on these domains instead of `data` (bundled texts by name: chat, general, "
        "everyday, prose, broad; or {name, path, weight}); default with dynamic_batch_loading: all five",
    )
    dynamic_batch_loading: bool = Field(
        default=False,
        description="Sample the domains by weights updated every update_every steps from each domain's loss "
        "gap to the source model's (LLM-Shearing); false: a fixed mix",
    )
    update_every: int = Field(default=10, ge=1, le=100_000, description="Steps between weight updates")
    eta: float = Field(
        default=1.0,
        gt=0,
        le=100,
        description="The update's step size: each domain's weight is multiplied by exp(eta * its loss gap), "
        "then all are renormalised (the paper's 1; a smaller eta keeps the mix from collapsing onto one "
        "domain when the gaps are nats wide)",
    )
    heldout_windows: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Per domain: dev windows (weight updates) and as many test windows",
    )

    @model_validator(mode="after")
    def _unique_domains(self) -> HealOptions:
        names = [d if isinstance(d, str) else d.name for d in self.domains or []]
        if len(set(names)) != len(names):
            raise ValueError("domain names must be unique")
        return self


class ReplaceOptions(BaseModel):
    """Depth by block replacement (LLM-Streamline): cut n + 1 contiguous layers (criterion kl: the block
    whose cut, unfitted, changes the model's answers least; influence: the block whose output is most like
    its input) and fit one layer, a copy of the block's most important one, to map the block's input hidden
    states to its output (relative MSE, plus kl_weight * the final KL on response tokens), all else frozen."""

    model_config = ConfigDict(extra="forbid")
    block_start: int | None = Field(default=None, ge=0, description="Cut the block starting at this layer")
    steps: int = Field(default=300, ge=0, le=100_000)
    lr: float = Field(default=1e-3, gt=0, le=1)
    kl_weight: float = Field(default=0.0, ge=0, le=100)
    temperature: float = Field(default=2.0, gt=0, le=100)
    criterion: Literal["kl", "influence"] = Field(default="kl", description="How the block is chosen")
    search_windows: int = Field(default=4, ge=1, le=10_000, description="Fitting windows the kl search reads")
    candidates: int = Field(default=6, ge=1, le=1000, description="Lowest-BI blocks the kl search scores")
    data: Literal["answers", "calibration", "instructions"] = Field(
        default="answers",
        description="Fitting text; answers: the full model's own answers to instruction prompts "
        "(workers/data/answers.jsonl, chat template applied; the KL counts the response tokens)",
    )
    compare_removal: bool = Field(
        default=True, description="Also report plain layer removal at the same target (healed the same way)"
    )


class PruneJobRequest(BaseModel):
    """Structured pruning to a target architecture: layers by block influence, MLP channels and KV groups by
    activation importance on calibration text (mode=random: seeded random choices at the same target)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["prune"]
    model: str = Field(min_length=1)
    target: PruneTargetRequest
    mode: Literal["activation", "random", "learned"] = Field(
        default="activation",
        description="learned: hard-concrete masks on layers, heads, MLP channels and the hidden dimension, "
        "trained toward the exact target shape with Lagrange multipliers (LLM-Shearing), on the heal data",
    )
    masks: MaskOptions | None = Field(default=None, description="mode learned: the mask phase")
    compare_random: bool = Field(default=True, description="Also report a random selection's perplexity")
    heal: HealOptions | None = None
    replace: ReplaceOptions | None = Field(default=None, description="Cut depth by block replacement")
    seq_len: int = Field(default=256, ge=8, le=4096)
    calibration_windows: int = Field(default=8, ge=1, le=256)
    seed: Seed = 0
    name: str | None = None

    _check_name = field_validator("name")(_slug)


class GrowJobRequest(BaseModel):
    """Function-preserving growth: identity copies of layers (o_proj and down_proj zeroed) inserted after
    the given layers, and/or MLP widened by duplicating channels (down_proj divided by the copy count)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["grow"]
    model: str = Field(min_length=1)
    insert_after: list[int] | None = Field(default=None, description="0-based layer indices")
    intermediate_size: int | None = Field(
        default=None, ge=1, le=2**31, description="New MLP width (>= the current)"
    )
    seed: Seed = 0
    name: str | None = None

    _check_name = field_validator("name")(_slug)

    @model_validator(mode="after")
    def _something(self) -> GrowJobRequest:
        if not self.insert_after and self.intermediate_size is None:
            raise ValueError("give insert_after and/or intermediate_size")
        return self


class SortJobRequest(BaseModel):
    """Sorted Fine-Tuning: loss = mean over `exits` of CE(LMHead(FinalNorm(h_n))) (FinalNorm(A_n h_n + b_n)
    with `exit_adapters`), shared norm and head, loss on response tokens only; then a fresh profile with
    perplexity per exit."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["sort"]
    model: str = Field(min_length=1)
    exits: list[int] | None = Field(default=None, description="Default: evenly spaced from 40% to full depth")
    data: str | None = Field(default=None, description="A JSONL file under an import root (default: shipped)")
    examples: list[dict[str, Any]] | None = Field(
        default=None, description='Inline records: {"prompt", "response"} or {"messages"}', max_length=100_000
    )
    steps: int | None = Field(default=None, ge=1, le=1_000_000)
    epochs: float | None = Field(default=None, gt=0, le=1000)
    lr: float = Field(default=5e-5, gt=0, le=1)
    seq_len: int = Field(default=512, ge=8, le=8192)
    batch_size: int = Field(default=8, ge=1, le=1024)
    warmup_steps: int = Field(default=0, ge=0)
    gradient_checkpointing: bool = False
    distill: bool = Field(
        default=False, description="Targets: the source model's full-depth distribution, not the data tokens"
    )
    freeze_embeddings: bool = Field(default=False, description="Keep the embeddings and shared LM head fixed")
    exit_adapters: bool = Field(
        default=False,
        description="Train an affine exit adapter per exit below full depth jointly with the model; stored "
        "with the sorted model and served at those exits",
    )
    adapter_init: Literal["ridge", "identity"] = Field(
        default="ridge", description="Adapters start from the ridge fit on the training data, or at identity"
    )
    adapter_lr: float = Field(default=1e-4, gt=0, le=1, description="Learning rate of the exit adapters")
    bf16_on_cpu: bool = Field(default=False, description="bfloat16 autocast on CPU too (always on CUDA)")
    seed: Seed = 0
    name: str | None = None

    _check_name = field_validator("name")(_slug)


class FitExitsJobRequest(BaseModel):
    """Exit adapters: per exit k an affine map A_k h_k + b_k ~ h_L fitted in closed form (identity-centred
    ridge, lambda = ridge x mean diag X^T X) on the data and a scale s_k on its normed output (an inverse
    temperature, fitted by Newton's method to the full model's distribution), optionally refined by
    `distill_steps` of KL distillation from full depth; stored with the model, then a fresh profile."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["fit_exits"]
    model: str = Field(min_length=1, description="A registered model; the adapters are stored with it")
    exits: list[int] | None = Field(default=None, min_length=1, description="Default: every depth below L")
    training_file: str | None = Field(
        default=None, max_length=64, description='An uploaded file id (POST /v1/files, purpose "fine-tune")'
    )
    data: str | None = Field(default=None, description="A JSONL file under an import root (default: bundled)")
    examples: list[dict[str, Any]] | None = Field(
        default=None, description='Inline records: {"prompt", "response"} or {"messages"}', max_length=100_000
    )
    bundled: BundledText = Field(
        default=DEFAULT_TEXT,
        description="Without training_file, data or examples: the default model's chat answers (chat), its "
        "own general text (general: samples without a chat template), its samples opened on everyday topics "
        "(everyday), original prose written for Strata (prose), human-written manuals, reference, docstrings "
        "and licences (broad), or a mix: mixed (a chat record and a general one in turn), prose+chat (a "
        "prose record and a chat record in turn) or broad+prose+chat (one of each in turn; the default)",
    )
    max_tokens: int = Field(
        default=DEFAULT_MAX_TOKENS,
        ge=16,
        le=10_000_000,
        description="Fitting tokens used at most (with mix_bundled: of the user's text and of the bundled)",
    )
    mix_bundled: bool = Field(
        default=False,
        description="With training_file, data or examples: fit on them and on the bundled text too "
        "(`bundled`, up to max_tokens of it), so the exits learn the user's register and keep the broad one",
    )
    user_weight: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        allow_inf_nan=False,
        description="With mix_bundled: how many times each token of the user's text counts in the ridge fit "
        "against a bundled token (the scales and distillation draw on both texts as they are)",
    )
    fit_on: Literal["all", "responses"] = Field(
        default="all", description="Fit on every token, or on response tokens only (all serve as context)"
    )
    seq_len: int = Field(default=256, ge=8, le=8192, description="Tokens per forward window")
    ridge: float = Field(
        default=1e-4, ge=0, le=1e3, allow_inf_nan=False, description="lambda / mean diag of X^T X"
    )
    distill_steps: int = Field(default=0, ge=0, le=100_000, description="Adam steps of KL distillation")
    distill_exits: list[int] | None = Field(
        default=None, min_length=1, description="The exits distilled (default: every fitted exit)"
    )
    lr: float = Field(
        default=1e-3, gt=0, le=1, allow_inf_nan=False, description="Distillation's peak learning rate"
    )
    distill_tokens: int = Field(default=8192, ge=16, le=1_000_000, description="Tokens cached to distil")
    distill_batch_tokens: int = Field(default=256, ge=1, le=65_536, description="Tokens a distillation step")
    fit_scale: bool = Field(default=True, description="Fit each exit's scale (inverse temperature); else 1")
    scale_tokens: int = Field(default=1024, ge=16, le=65_536, description="Tokens the scales are fitted on")
    pointer: bool = Field(
        default=True, description="Fit each exit's pointer (a cache over its states that copies from context)"
    )
    pointer_tokens: int = Field(default=4096, ge=16, le=65_536, description="Tokens pointers are fitted on")
    seed: Seed = 0


class TruncateJobRequest(BaseModel):
    """Export exit n as a standalone model: layers 1..n + final norm + head, num_hidden_layers = n."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["truncate"]
    model: str = Field(min_length=1)
    num_layers: int = Field(ge=1)
    name: str | None = None

    _check_name = field_validator("name")(_slug)


class MaterialiseJobRequest(BaseModel):
    """A variant stored as its delta alone (record `delta.full_weights: false`), written out as a full model
    of its own: base + delta, the weights it is served with, to download from /files or export."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["materialise"]
    model: str = Field(min_length=1)
    name: str | None = Field(default=None, description="Id of the full model (default: <model>-full-<6 hex>)")

    _check_name = field_validator("name")(_slug)


class ExtractLoraJobRequest(BaseModel):
    """A PEFT LoRA adapter from a fine-tune and its base, as mergekit-extract-lora makes it: each linear
    layer's delta as B @ A from a truncated SVD (rank <= max_rank, singular values <= sv_epsilon dropped);
    embeddings, LM head and norms at full rank. Registered as an adapter of `base`."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["extract_lora"]
    model: str = Field(min_length=1, description="The fine-tuned model")
    base: str = Field(min_length=1, description="The model it was fine-tuned from")
    max_rank: int = Field(default=128, ge=1, le=8192)
    sv_epsilon: float = Field(default=0.0, ge=0, le=1e6, allow_inf_nan=False)
    name: str | None = None

    _check_name = field_validator("name")(_slug)


class FinetuneJobRequest(FinetuneConfig):
    """Supervised fine-tuning, full-parameter or LoRA (W + alpha/r B A on `lora_targets`, merged into the
    output; the PEFT adapter is kept in the model's `lora_adapter/`). Chat records get the model's chat
    template and the loss on assistant turns only; prompt/response (or completion) and text records work
    too. The data: an uploaded file (`training_file`, see POST /v1/files), a JSONL file under an import
    root (`data`), or inline `examples`; validation loss on `validation_file` (or a held-out
    `validation_fraction`) every `eval_every` steps and at the end."""

    kind: Literal["finetune"]
    model: str = Field(min_length=1, description="The model to fine-tune (registered id or directory)")
    keep_full_weights: bool = Field(
        default=False,
        description="Keep the fine-tune's full weights beside its delta to `model` (default: the delta "
        "alone, materialised where a job reads the model)",
    )
    training_file: str | None = Field(default=None, description="An uploaded file id (file-...)")
    validation_file: str | None = Field(default=None, description="An uploaded file id (file-...)")
    data: str | None = Field(default=None, description="A JSONL file under an import root")
    examples: list[dict[str, Any]] | None = Field(
        default=None,
        description='Inline records: {"messages"}, {"prompt", "response"} or {"text"}',
        max_length=100_000,
    )
    suffix: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._-]{1,40}$",
        description="Part of the output's default name: <model>-ft-<suffix>-<6 hex>",
    )
    name: str | None = None

    _check_name = field_validator("name")(_slug)


class TeacherModel(BaseModel):
    """A model registered in Strata, run by the job's worker in-process at exit depth `depth` (default:
    full depth)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128)
    depth: int | None = Field(default=None, ge=1, le=100_000)


class TeacherEndpointRef(BaseModel):
    """An OpenAI-compatible endpoint configured by name in STRATA_TEACHER_ENDPOINTS (URL and key come from
    the settings, never from a request), and the model to ask there."""

    model_config = ConfigDict(extra="forbid")
    endpoint: str = Field(min_length=1, max_length=100)
    model: str = Field(min_length=1, max_length=200)


class DistillJobRequest(DistillOptions):
    """Distilling step-by-step (arXiv 2305.02301): the teacher's few-shot chain-of-thought rationales and
    labels train the student on two tasks, `[label] <input>` -> label and `[rationale] <input>` ->
    rationale, with loss L_label + rationale_weight * L_rationale on the target tokens; only the label task
    runs at inference. Records `{"input", "label"?, "rationale"?}` (upload with purpose "distill", or a
    JSONL path under an import root); teacher answers that do not parse or disagree with a gold label are
    dropped and counted. The result and the model's record hold `eval`: held-out accuracy of
    `step_by_step`, of each baseline (`label_only`: gold labels; `distill_labels`: teacher labels) and
    of the teacher's few-shot answers."""

    kind: Literal["distill"]
    student: str = Field(min_length=1, description="The model to train (registered id or directory)")
    teacher: Literal["data"] | TeacherModel | TeacherEndpointRef = Field(
        description='"data" (each record brings its rationale), a registered model, or a configured endpoint'
    )
    train_file: str = Field(min_length=1, description="An uploaded file id (file-...) or a JSONL path")
    eval_file: str = Field(min_length=1, description="Held-out records with gold labels, file id or path")
    task: TaskSpec = Field(default_factory=TaskSpec)
    seed: Seed = 0
    name: str | None = None

    _check_name = field_validator("name")(_slug)


JobRequest = Annotated[
    MergeJobRequest
    | MoeJobRequest
    | VariantsJobRequest
    | ProfileJobRequest
    | SparsifyJobRequest
    | PruneJobRequest
    | GrowJobRequest
    | SortJobRequest
    | FitExitsJobRequest
    | TruncateJobRequest
    | MaterialiseJobRequest
    | ExtractLoraJobRequest
    | FinetuneJobRequest
    | DistillJobRequest,
    Field(discriminator="kind"),
]

JobStatus = Literal["queued", "started", "finished", "failed", "canceled"]


class JobView(BaseModel):
    id: str
    kind: str
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    message: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    elapsed_s: float | None = Field(default=None, description="Run time so far, or in all once ended")
    result: dict[str, Any] | None = None
    error: str | None = None
    spec: dict[str, Any]


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]


class ModelObject(BaseModel):
    """OpenAI's model object, with Strata's registry record under `strata`."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "strata"
    strata: ModelRecord

    @classmethod
    def of(cls, record: ModelRecord) -> ModelObject:
        return cls(id=record.id, created=int(record.created), strata=record)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelFile(BaseModel):
    name: str
    size_bytes: int


class ModelFileList(BaseModel):
    """The files of a stored model or adapter, each downloadable at /v1/models/{id}/files/{name}."""

    object: Literal["list"] = "list"
    data: list[ModelFile]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    id: str = Field(description="The id to register the model under")
    path: str = Field(description="A Hugging Face directory (config.json + safetensors) under an import root")
    base: str | None = Field(
        default=None,
        description="A registered model this one derives from: a model of its shapes is stored and served as "
        "the base + a compressed delta; a PEFT LoRA adapter directory is served over the base unmerged",
    )
    delta_error_budget: float = Field(
        default=0.05, ge=0, lt=1, description="With `base`: see the variants job"
    )
    keep_full_weights: bool = Field(
        default=False,
        description="With `base`: keep the full weights beside the delta (see the variants job)",
    )

    _check_id = field_validator("id")(_slug)


class ErrorBody(BaseModel):
    """Every 4xx/5xx: `detail` says what is wrong (a message, or pydantic's list of field errors)."""

    detail: str | list[dict[str, Any]]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        401: "Missing or invalid API key",
        404: "Unknown model or job",
        409: "The output id is taken",
        413: "Request body too large",
        415: "Unsupported content type",
        422: "Invalid request",
        429: "Too many queued requests or jobs; see Retry-After",
        503: "Redis or the inference workers are unavailable",
        507: "Not enough disk for the output model",
    }.items()
}


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    redis: bool
    workers: int = Field(description="Live job workers")
    inference_workers: int = Field(default=0, description="Live inference workers")
    resident: dict[str, Any] = Field(
        default_factory=dict,
        description="Per live inference worker: the bases it holds, each with the variants held over it, "
        "their delta bytes and how many times the worker has loaded it (`loads`; above 1: it was dropped "
        "and loaded again)",
    )
    capacity: dict[str, int] = Field(
        default_factory=dict,
        description="Per live inference worker: the bases it keeps loaded (--max-models); requests are "
        "routed by it",
    )
