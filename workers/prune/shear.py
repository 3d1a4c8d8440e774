"""Targeted structured pruning as LLM-Shearing does it (Xia et al., arXiv 2310.06694): hard-concrete (L0)
gates on layers, KV groups, query heads, MLP channels and the hidden dimension, learned jointly with the model
on the language-modelling loss while Lagrange multipliers push each gate family's expected size to an exact
target shape; then the highest-scoring components are kept: a plain model of exactly that shape.

Hard-concrete gate (Louizos et al., 2018) with logit a, temperature b, stretch (l, r) = (-0.1, 1.1):

    u ~ U(0, 1),  z = min(1, max(0, sigmoid((log u - log(1 - u) + a) / b) * (r - l) + l))
    P(z > 0) = sigmoid(a - b * log(-l / r))                  (its expectation of being kept)

For a gate family t (one row per layer for per-layer families) with N_t gates and target size n_t:

    s_hat_t = 1 - sum_i P(z_i > 0) / N_t,   s_t = 1 - n_t / N_t           (expected and target sparsity)
    L = CE(model, sampled gates) + sum_t mean_rows[lambda1_t (s_hat_t - s_t) + lambda2_t (s_hat_t - s_t)^2]

minimised over the model and the gate logits, maximised over the multipliers (lambda1_t, lambda2_t), which
start at 0. Gate logits start at 5 and are clamped to [log 1e-2, log 1e2]; the target sparsities ramp up
linearly from 0 over the first `warmup` fraction of the steps (the paper's code: 20 %).

Where the gates act (a LLaMA-style decoder): a layer gate scales the layer's residual update; KV-group and
query-head gates scale the heads' outputs entering o_proj; channel gates the input of down_proj; hidden gates
the embeddings and every o_proj / down_proj output (the residual stream's dimensions).

Extraction keeps, per family, the n_t gates with the largest logits (per layer for per-layer families, so all
layers share one shape). Hidden dimensions are cut from the embeddings, every projection, every RMSNorm and
the LM head; an RMSNorm over d' of d dimensions sees the same sum of squares divided by d' instead of d, so
its weights are multiplied by sqrt(d / d'): the cut model computes what the source computes with those
dimensions gated to 0 (up to the norm's epsilon).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from workers.device import default_device
from workers.prune.layers import Progress, decoder_layers, restack
from workers.prune.width import attention_shape, slice_linear
from workers.train.data import Batch
from workers.train.trainer import StepInfo, TrainConfig, causal_lm_loss, train

LIMIT_L, LIMIT_R, EPS = -0.1, 1.1, 1e-6
LOGIT_INIT = 5.0
LOGIT_MIN, LOGIT_MAX = math.log(1e-2), math.log(1e2)


class MaskOptions(BaseModel):
    """The mask phase: steps, learning rates (gate logits, Lagrange multipliers, model weights), gate
    temperature, sequence length and batch size."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(default=40, ge=1, le=100_000)
    mask_lr: float = Field(default=1.0, gt=0, le=10, description="AdamW lr of the gate logits (the paper's)")
    multiplier_lr: float = Field(
        default=1.0, gt=0, le=10, description="AdamW lr (ascent) of the multipliers (the paper's)"
    )
    model_lr: float = Field(default=1e-4, ge=0, le=1, description="lr of the model's weights (0: frozen)")
    temperature: float = Field(default=2 / 3, gt=0, le=10, description="Hard-concrete temperature b")
    seq_len: int = Field(default=256, ge=8, le=4096, description="Rows are cut to this many tokens")
    batch_size: int = Field(default=1, ge=1, le=64)
    warmup: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Fraction of the steps over which the target sparsity ramps up from 0",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


@dataclass(frozen=True)
class Shape:
    """An exact LLaMA-style decoder shape (head_dim is the source's; query heads per KV group uniform)."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @classmethod
    def of(cls, config) -> Shape:
        return cls(
            num_hidden_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            intermediate_size=config.intermediate_size,
        )


SHAPE_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


def shape_of_model(source_config: dict, target_config: dict) -> dict[str, int]:
    """The target sizes a `target_model`'s config.json gives; ValueError unless it is of the source's
    architecture family (model_type) with the source's head_dim (heads are cut whole)."""
    family, other = source_config.get("model_type"), target_config.get("model_type")
    if family != other:
        raise ValueError(
            f"target_model is a {other!r} model, the source a {family!r} one: same family needed"
        )

    def head_dim(config: dict) -> int | None:
        heads = config.get("num_attention_heads")
        return config.get("head_dim") or (
            config["hidden_size"] // heads if heads and config.get("hidden_size") else None
        )

    if head_dim(source_config) != head_dim(target_config):
        raise ValueError(
            f"target_model has head_dim {head_dim(target_config)}, the source {head_dim(source_config)}: "
            "heads are cut whole, so they must match"
        )
    sizes = {key: target_config.get(key) for key in SHAPE_KEYS}
    sizes["num_key_value_heads"] = sizes["num_key_value_heads"] or sizes["num_attention_heads"]
    missing = [key for key, value in sizes.items() if not isinstance(value, int)]
    if missing:
        raise ValueError(f"target_model's config lacks {', '.join(missing)}")
    return sizes  # type: ignore[return-value]


def check_shape(source: Shape, target: Shape) -> None:
    """ValueError unless `target` is reachable from `source` by cutting: no size larger, heads divisible
    into the KV groups, the hidden size a multiple of the heads, no more query heads per group than the
    source has."""
    for name in Shape.__dataclass_fields__:
        want, have = getattr(target, name), getattr(source, name)
        if not 1 <= want <= have:
            raise ValueError(
                f"target {name}={want} must lie in [1, {have}] (the source's); pruning only shrinks"
            )
    if target.num_attention_heads % target.num_key_value_heads:
        raise ValueError(
            f"target num_attention_heads={target.num_attention_heads} is not divisible into "
            f"num_key_value_heads={target.num_key_value_heads} groups"
        )
    if target.hidden_size % target.num_attention_heads:
        raise ValueError(
            f"target hidden_size={target.hidden_size} is not a multiple of num_attention_heads="
            f"{target.num_attention_heads} (transformers' Llama config requires it)"
        )
    n_rep = source.num_attention_heads // source.num_key_value_heads
    if target.num_attention_heads // target.num_key_value_heads > n_rep:
        raise ValueError(
            f"target has {target.num_attention_heads // target.num_key_value_heads} query heads per KV "
            f"group, the source only {n_rep}"
        )


def keep_probability(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(z > 0) = sigmoid(a - b log(-l / r)) of each hard-concrete gate."""
    return torch.sigmoid(logits - temperature * math.log(-LIMIT_L / LIMIT_R))


def sample_gates(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One draw z of each gate (see the module docstring), differentiable in the logits."""
    u = torch.rand(logits.shape, generator=generator).clamp(EPS, 1 - EPS).to(logits.device)
    s = torch.sigmoid((u.log() - (1 - u).log() + logits) / temperature)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)


def lagrangian(
    expected_sparsity: torch.Tensor, target_sparsity: float, lambda1: torch.Tensor, lambda2: torch.Tensor
) -> torch.Tensor:
    """mean over rows of lambda1 (s_hat - s) + lambda2 (s_hat - s)^2."""
    gap = expected_sparsity - target_sparsity
    return (lambda1 * gap + lambda2 * gap.square()).mean()


class Gates(nn.Module):
    """The gate logits of every family the target shrinks, and their Lagrange multipliers."""

    def __init__(self, source: Shape, target: Shape, temperature: float):
        super().__init__()
        self.source, self.target, self.temperature = source, target, temperature
        n_rep = source.num_attention_heads // source.num_key_value_heads
        L, K = source.num_hidden_layers, source.num_key_value_heads  # noqa: N806
        shapes = {
            "layer": ((L,), target.num_hidden_layers),
            "kv": ((L, K), target.num_key_value_heads),
            "head": ((L, K, n_rep), target.num_attention_heads // target.num_key_value_heads),
            "intermediate": ((L, source.intermediate_size), target.intermediate_size),
            "hidden": ((source.hidden_size,), target.hidden_size),
        }
        self.sizes: dict[str, int] = {}
        self.logits = nn.ParameterDict()
        self.lambda1, self.lambda2 = nn.ParameterDict(), nn.ParameterDict()
        for name, (shape, keep) in shapes.items():
            if keep < shape[-1]:
                self.logits[name] = nn.Parameter(torch.full(shape, LOGIT_INIT))
                self.lambda1[name] = nn.Parameter(torch.zeros(()))
                self.lambda2[name] = nn.Parameter(torch.zeros(()))
                self.sizes[name] = keep
        self.z: dict[str, torch.Tensor] = {}  # the gates the hooks apply (sampled, or fixed)

    def clamp_(self) -> None:
        with torch.no_grad():
            for logits in self.logits.values():
                logits.clamp_(LOGIT_MIN, LOGIT_MAX)

    def sample(self, generator: torch.Generator | None = None) -> None:
        self.z = {name: sample_gates(a, self.temperature, generator) for name, a in self.logits.items()}

    def expected_sizes(self) -> dict[str, torch.Tensor]:
        """Expected kept gates per row of each family (a scalar for layer and hidden)."""
        return {name: keep_probability(a, self.temperature).sum(-1) for name, a in self.logits.items()}

    def penalty(self, ramp: float = 1.0) -> torch.Tensor:
        """sum_t of the Lagrangian terms (module docstring), each target sparsity times `ramp` (warm-up)."""
        total = torch.zeros((), device=next(iter(self.logits.values())).device)
        for name, expected in self.expected_sizes().items():
            n = self.logits[name].shape[-1]
            target = (1 - self.sizes[name] / n) * ramp
            total = total + lagrangian(1 - expected / n, target, self.lambda1[name], self.lambda2[name])
        return total

    def keep(self) -> dict[str, torch.Tensor]:
        """The kept indices of each family: the top n_t logits of each row, in ascending index order."""
        kept = {}
        for name, a in self.logits.items():
            top = torch.topk(a.detach(), self.sizes[name], dim=-1).indices
            kept[name] = top.sort(dim=-1).values
        return kept

    def binary(self) -> dict[str, torch.Tensor]:
        """0/1 gates: 1 exactly on the kept components."""
        return {
            name: torch.zeros_like(self.logits[name]).scatter_(-1, index, 1.0).detach()
            for name, index in self.keep().items()
        }


def _scale(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return x * z.to(x.dtype)


def attach(model: nn.Module, gates: Gates) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that apply `gates.z` (whatever it holds at each forward) to the model; remove them when done."""
    kv_heads, n_rep, head_dim = attention_shape(model)
    handles = []

    def hidden_out(module, args, output):
        z = gates.z.get("hidden")
        return output if z is None else _scale(output, z)

    def layer_hook(index: int):
        def hook(module, args, kwargs, output):
            z = gates.z.get("layer")
            if z is None:
                return output
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            y = x + _scale(y - x, z[index])
            return (y, *output[1:]) if isinstance(output, tuple) else y

        return hook

    def heads_hook(index: int):
        def hook(module, args):
            z_kv, z_head = gates.z.get("kv"), gates.z.get("head")
            if z_kv is None and z_head is None:
                return None
            a = args[0]
            z = torch.ones(kv_heads, n_rep, device=a.device)
            if z_kv is not None:
                z = z * z_kv[index][:, None]
            if z_head is not None:
                z = z * z_head[index]
            shaped = a.unflatten(-1, (kv_heads, n_rep, head_dim))
            return (_scale(shaped, z[..., None]).flatten(-3), *args[1:])

        return hook

    def channels_hook(index: int):
        def hook(module, args):
            z = gates.z.get("intermediate")
            return None if z is None else (_scale(args[0], z[index]), *args[1:])

        return hook

    handles.append(model.get_input_embeddings().register_forward_hook(hidden_out))
    for i, layer in enumerate(decoder_layers(model)):
        handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(heads_hook(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(channels_hook(i)))
        handles.append(layer.self_attn.o_proj.register_forward_hook(hidden_out))
        handles.append(layer.mlp.down_proj.register_forward_hook(hidden_out))
    return handles


def _norms(model: nn.Module) -> list[nn.Module]:
    """Every RMSNorm over the hidden dimension: each layer's two, and the final one."""
    norms = [
        m for layer in decoder_layers(model) for m in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    from workers.early_exit.forward import decoder_stack

    return [*norms, decoder_stack(model).norm]


def first_components(source: Shape, target: Shape) -> dict[str, torch.Tensor]:
    """Keep the first n_t of each family (the first layers, groups, heads, channels, dimensions): the
    selection of a baseline that uses no importance at all, in the form `extract` takes."""
    gates = Gates(source, target, 1.0)
    return {
        name: torch.arange(gates.sizes[name]).expand(*a.shape[:-1], -1).clone()
        for name, a in gates.logits.items()
    }


def extract(model: nn.Module, kept: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` cut to the kept components (`Gates.keep()`): exactly the target shape (module
    docstring)."""
    kv_heads, n_rep, head_dim = attention_shape(model)
    out = copy.deepcopy(model)
    layers = list(decoder_layers(out))
    order = kept["layer"].tolist() if "layer" in kept else list(range(len(layers)))
    for old in order:
        layer = layers[old]
        attn, mlp = layer.self_attn, layer.mlp
        groups = kept["kv"][old] if "kv" in kept else torch.arange(kv_heads)
        per_group = (
            kept["head"][old][groups] if "head" in kept else torch.arange(n_rep).expand(len(groups), -1)
        )
        heads = (groups[:, None] * n_rep + per_group).reshape(-1)
        q_rows = (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        if len(q_rows) != attn.q_proj.out_features:
            slice_linear(attn.q_proj, rows=q_rows)
            slice_linear(attn.o_proj, cols=q_rows)
        if len(kv_rows) != attn.k_proj.out_features:
            slice_linear(attn.k_proj, rows=kv_rows)
            slice_linear(attn.v_proj, rows=kv_rows)
        if "intermediate" in kept:
            channels = kept["intermediate"][old]
            slice_linear(mlp.gate_proj, rows=channels)
            slice_linear(mlp.up_proj, rows=channels)
            slice_linear(mlp.down_proj, cols=channels)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = len(channels)
        for module in (attn, mlp):
            for attr, value in (("num_key_value_groups", len(per_group[0])), ("head_dim", head_dim)):
                if hasattr(module, attr):
                    setattr(module, attr, value)
    restack(out, [layers[i] for i in order], order)
    config = out.config
    if "hidden" in kept:
        dims = kept["hidden"]
        d, d_new = config.hidden_size, len(dims)
        embeddings = out.get_input_embeddings()
        tied = out.get_output_embeddings() is not None and (
            out.get_output_embeddings().weight is embeddings.weight
        )
        embeddings.weight = nn.Parameter(embeddings.weight.data[:, dims].clone().contiguous())
        embeddings.embedding_dim = d_new
        for layer in decoder_layers(out):
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                slice_linear(linear, cols=dims)
            for linear in (attn.o_proj, mlp.down_proj):
                slice_linear(linear, rows=dims)
        for norm in _norms(out):
            norm.weight = nn.Parameter((norm.weight.data[dims] * math.sqrt(d / d_new)).clone())
        head = out.get_output_embeddings()
        if tied:
            head.weight = embeddings.weight
        else:
            slice_linear(head, cols=dims)
        config.hidden_size = d_new
    config.head_dim = head_dim
    config.num_key_value_heads = len(kept["kv"][0]) if "kv" in kept else kv_heads
    heads_per_group = kept["head"].shape[-1] if "head" in kept else n_rep
    config.num_attention_heads = config.num_key_value_heads * heads_per_group
    if "intermediate" in kept:
        config.intermediate_size = kept["intermediate"].shape[-1]
    return out


@dataclass
class MaskReport:
    steps: int
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    expected: dict[str, float] = field(default_factory=dict)  # expected kept per row at the end (mean)
    target: dict[str, int] = field(default_factory=dict)
    multipliers: dict[str, list[float]] = field(default_factory=dict)


def learn_masks(
    model: nn.Module,
    target: Shape,
    stream: Iterator[Batch],
    options: MaskOptions | None = None,
    progress: Progress | None = None,
    device: str | torch.device | None = None,
) -> tuple[Gates, MaskReport]:
    """Train the gates (and, unless model_lr is 0, the model's weights, in place) on `stream` with the shared
    trainer; the loss is the language-modelling loss under sampled gates plus the Lagrangian penalty."""
    options = options or MaskOptions()
    source = Shape.of(model.config)
    check_shape(source, target)
    gates = Gates(source, target, options.temperature)
    if not gates.sizes:
        raise ValueError("the target shape equals the source's: nothing to prune")
    generator = torch.Generator().manual_seed(options.seed)
    report = MaskReport(steps=options.steps, target=dict(gates.sizes))

    done = [0]
    ramp_steps = options.warmup * options.steps

    def loss_fn(net: nn.Module, batch: Batch) -> torch.Tensor:
        n = options.seq_len  # rows longer than the mask phase's sequence length are cut to it
        batch = Batch(batch.input_ids[:, :n], batch.labels[:, :n], batch.attention_mask[:, :n])
        gates.clamp_()
        gates.sample(generator)
        ramp = min(1.0, (done[0] + 1) / ramp_steps) if ramp_steps else 1.0
        return causal_lm_loss(net, batch) + gates.penalty(ramp)

    def on_step(info: StepInfo) -> None:
        done[0] = info.step
        report.losses.append(info.loss)
        if progress is not None:
            progress(info.step, info.total, f"mask loss {info.loss:.4f}")

    frozen = options.model_lr == 0
    for p in model.parameters():
        p.requires_grad_(not frozen)
    multipliers = [*gates.lambda1.values(), *gates.lambda2.values()]
    groups = [
        {"params": list(gates.logits.values()), "lr": options.mask_lr},
        {"params": multipliers, "lr": options.multiplier_lr, "maximize": True},
    ]
    config = TrainConfig(
        steps=options.steps,
        lr=options.model_lr or options.mask_lr,  # frozen: no model group takes this lr
        schedule="constant",
        batch_size=options.batch_size,
        seed=options.seed,
    )
    device = torch.device(device) if device is not None else default_device()
    gates.to(device)
    handles = attach(model, gates)
    try:
        result = train(
            model, [], loss_fn, config, progress=on_step, device=device, stream=stream, extra_groups=groups
        )
    finally:
        for handle in handles:
            handle.remove()
        gates.z = {}
        for p in model.parameters():
            p.requires_grad_(True)
    gates.clamp_()
    report.seconds = result.seconds
    with torch.no_grad():
        report.expected = {k: round(float(v.mean()), 3) for k, v in gates.expected_sizes().items()}
    report.multipliers = {
        k: [round(gates.lambda1[k].item(), 4), round(gates.lambda2[k].item(), 4)] for k in gates.sizes
    }
    return gates, report


@torch.no_grad()
def masked_logits(model: nn.Module, gates: Gates, ids: torch.Tensor) -> torch.Tensor:
    """The source model's logits with the binary kept/cut gates applied (for checking an extraction)."""
    handles = attach(model, gates)
    gates.z = gates.binary()
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        gates.z = {}
        for handle in handles:
            handle.remove()
