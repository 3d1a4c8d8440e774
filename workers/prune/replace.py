"""Depth pruning by block replacement (LLM-Streamline, arXiv 2403.19135): cut a contiguous block of n
decoder layers and put one ordinary decoder layer in its place, fitted to do the block's work.

With h_k the residual stream after k layers (h_0 the embeddings, h_L the last layer's output, before the
final norm), the influence of the block of n layers starting at layer i (0-based) is

    BI_n(i) = 1 - E_{x, t} [ cos(h_{i, t}, h_{i+n, t}) ]          i = 0 .. L - n

Its replacement R starts as a copy of the block's most important layer j* (the highest single-layer BI_1,
ShortGPT). Two criteria choose the block (FitOptions.criterion):

    influence:  the block of lowest BI_n (the one that turns the residual stream least, taken as a whole)
    kl:         among the `candidates` blocks of lowest BI_n, the one of lowest
                D(i) = E_{t in S} t^2 KL( p(. | h_L) || p_i(. | h_L^i) ),     p = softmax(z / t)

where z = LMHead(FinalNorm(h_L)) are the source's logits, h_L^i the stream when layer j* alone replaces
layers i .. i+n-1 (R as initialised, before any fitting), and S the positions whose next token is a
response token of the fitting text (every position when the text has no response mask). BI measures how
much the block turns the stream; D measures what cutting it costs the model's answers, and on the default
model they disagree (docs/prune-grow.md). R is then trained with everything else frozen:

    loss(R) = E || R(h_i) - h_{i+n} ||^2 / E || h_{i+n} ||^2
              + w * E_{t in S} t^2 KL( softmax(z / t) || softmax(z_R / t) )

z_R the logits when R's output runs on through the layers after the block. The result is a plain model of
L - n + 1 layers of the source's shape, so it has exactly as many parameters as the source with n - 1 layers
dropped. The hidden states come from `workers.early_exit.forward.residual_at_exits`, the one place that
collects them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn
from transformers.masking_utils import create_causal_mask

from workers.device import default_device
from workers.early_exit.forward import decoder_stack, residual_at_exits
from workers.prune.heal import kd_kl
from workers.prune.layers import Progress, decoder_layers, keep_layers


class FitOptions(BaseModel):
    """How the replacement layer is chosen and trained."""

    block_start: int | None = Field(default=None, ge=0, description="Cut this block (0-based first layer)")
    steps: int = Field(default=300, ge=0, le=100_000)
    lr: float = Field(default=1e-3, gt=0, le=1)
    kl_weight: float = Field(default=0.0, ge=0, le=100)
    temperature: float = Field(default=2.0, gt=0, le=100)
    criterion: Literal["influence", "kl"] = Field(
        default="kl", description="Choose the block by lowest BI_n, or by lowest KL of the cut on the answers"
    )
    search_windows: int = Field(default=4, ge=1, le=10_000, description="Fitting windows the KL search reads")
    candidates: int = Field(default=6, ge=1, le=1000, description="Lowest-BI blocks the KL search scores")


@dataclass(frozen=True)
class Block:
    start: int  # first layer of the block (0-based)
    size: int  # n layers
    init: int  # the layer (source index, inside the block) the replacement starts from

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.start + self.size))


@dataclass
class FitReport:
    steps: int
    mse_before: float = 0.0  # relative MSE on the fitting windows, replacement as initialised
    mse_after: float = 0.0
    losses: list[float] = field(default_factory=list)
    device: str = "cpu"


def check_block(num_layers: int, size: int, start: int | None = None) -> None:
    """Raise ValueError unless a block of `size` layers (starting at `start`) fits in the stack."""
    if not 1 <= size <= num_layers:
        raise ValueError(f"a block must hold between 1 and {num_layers} layers, got {size}")
    if start is not None and not 0 <= start <= num_layers - size:
        raise ValueError(
            f"a block of {size} layers starting at layer {start} crosses the end of the "
            f"{num_layers}-layer stack (last start: {num_layers - size})"
        )


def block_influences(
    model: nn.Module, batches: Sequence[torch.Tensor], size: int, progress: Progress | None = None
) -> tuple[list[float], list[float]]:
    """(BI_size(i) for every block start i, BI_1(j) for every layer j), from one pass per batch."""
    n = len(decoder_layers(model))
    check_block(n, size)
    device = next(model.parameters()).device
    block = torch.zeros(n - size + 1, dtype=torch.float64)
    single = torch.zeros(n, dtype=torch.float64)
    tokens = 0
    with torch.inference_mode():
        for done, ids in enumerate(batches):
            h = residual_at_exits(model, ids.to(device), range(n + 1))
            for i in range(n - size + 1):
                block[i] += F.cosine_similarity(h[i].float(), h[i + size].float(), dim=-1).sum().item()
            for j in range(n):
                single[j] += F.cosine_similarity(h[j].float(), h[j + 1].float(), dim=-1).sum().item()
            tokens += ids.numel()
            if progress is not None:
                progress(done + 1, len(batches), "block influence")
    if tokens == 0:
        raise ValueError("no calibration tokens")
    return (1 - block / tokens).tolist(), (1 - single / tokens).tolist()


def choose_block(block_influence: Sequence[float], layer_influence: Sequence[float], size: int) -> Block:
    """The block of lowest BI_size (ties: the lower start), started from its layer of highest BI_1."""
    start = min(range(len(block_influence)), key=lambda i: (block_influence[i], i))
    inside = range(start, start + size)
    return Block(start=start, size=size, init=max(inside, key=lambda j: (layer_influence[j], -j)))


def random_block(num_layers: int, size: int, seed: int) -> Block:
    """A block start and an initial layer inside it drawn uniformly at random, reproducible from the seed."""
    check_block(num_layers, size)
    generator = torch.Generator().manual_seed(seed)
    start = int(torch.randint(num_layers - size + 1, (1,), generator=generator))
    return Block(start=start, size=size, init=start + int(torch.randint(size, (1,), generator=generator)))


def cut_block(model: nn.Module, block: Block) -> nn.Module:
    """A copy of the model with the block's layers replaced by one copy of layer `block.init`."""
    n = len(decoder_layers(model))
    check_block(n, block.size, block.start)
    if block.init not in block.layers:
        raise ValueError(f"the initial layer {block.init} is not inside the block {block.layers}")
    order = [*range(block.start), block.init, *range(block.start + block.size, n)]
    return keep_layers(model, order)


def layer_inputs(model: nn.Module, hidden: torch.Tensor) -> dict:
    """The keyword arguments a decoder layer of `model` takes for an unpadded (B, T, d) window, no cache."""
    inner = decoder_stack(model)
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(
        config=inner.config,
        inputs_embeds=hidden,
        attention_mask=None,
        cache=None,
        position_ids=position_ids,
    )
    return {
        "attention_mask": mask,
        "position_embeddings": inner.rotary_emb(hidden, position_ids=position_ids),
        "position_ids": position_ids,
        "use_cache": False,
    }


def _output(value: object) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


def head(model: nn.Module, hidden: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """LMHead(FinalNorm(h)): (B, T, V) logits, or (N, V) at the N positions where `where` is True."""
    if where is not None:
        hidden = hidden[where]
    return model.lm_head(decoder_stack(model).norm(hidden))


def tail_logits(
    model: nn.Module, hidden: torch.Tensor, first: int, where: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits when `hidden` enters layer `first` of the model and runs on to the head (at `where` only)."""
    inputs = layer_inputs(model, hidden)
    for layer in decoder_layers(model)[first:]:
        hidden = _output(layer(hidden, **inputs))
    return head(model, hidden, where)


def predicting(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The positions whose next token is marked in `mask` (its logits predict a response token)."""
    if mask is None:
        return None
    out = torch.zeros_like(mask, dtype=torch.bool)
    out[..., :-1] = mask[..., 1:].bool()
    return out


def masked_kd(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, where: torch.Tensor | None = None
) -> torch.Tensor:
    """t^2 KL(teacher || student) averaged over the positions where `where` is True (all when None);
    logits already cut to those positions may be passed with where=None. Zero when no position counts."""
    if where is not None:
        student, teacher = student[where], teacher[where]
    if student.numel() == 0:
        return student.sum() * 0
    return kd_kl(student, teacher, temperature)


def block_distances(
    source: nn.Module,
    batches: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None,
    size: int,
    layer_influence: Sequence[float],
    temperature: float = 2.0,
    progress: Progress | None = None,
    starts: Sequence[int] | None = None,
) -> list[float]:
    """D(i) of the module docstring for every block start i (inf for those not in `starts`, when given):
    the mean t^2 KL(source || source with layers i .. i+size-1 replaced by their layer of highest BI_1,
    unfitted) over the positions predicting a response token (every position when `masks` is None), from
    one pass of the source per batch."""
    layers = decoder_layers(source)
    n = len(layers)
    check_block(n, size)
    device = next(source.parameters()).device
    total = torch.zeros(n - size + 1, dtype=torch.float64)
    scored = sorted(set(starts)) if starts is not None else range(n - size + 1)
    for i in scored:
        check_block(n, size, i)
    counted = 0
    with torch.inference_mode():
        for done, ids in enumerate(batches):
            ids = ids.to(device)
            where = predicting(masks[done]).to(device) if masks is not None else torch.ones_like(ids).bool()
            positions = int(where.sum())
            if positions:
                h = residual_at_exits(source, ids, range(n + 1))
                teacher = head(source, h[n], where)
                inputs = layer_inputs(source, h[0])
                for i in scored:
                    init = max(range(i, i + size), key=lambda j: (layer_influence[j], -j))
                    x = _output(layers[init](h[i], **inputs))
                    for layer in layers[i + size :]:
                        x = _output(layer(x, **inputs))
                    total[i] += masked_kd(head(source, x, where), teacher, temperature).item() * positions
                counted += positions
            if progress is not None:
                progress(done + 1, len(batches), "block search (KL of each cut)")
    if counted == 0:
        raise ValueError("no positions to score the blocks on")
    distance = (total / counted).tolist()
    return [d if i in scored else float("inf") for i, d in enumerate(distance)]


@dataclass
class Pairs:
    """Cached hidden states of the source for each fitting window: block input, block output, and (when the
    final KL is on) its last layer's output h_L, whose logits are recomputed per step (a window's logits
    take 800x the memory), with the positions the KL counts (None: all)."""

    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    finals: list[torch.Tensor] | None = None
    where: list[torch.Tensor | None] = field(default_factory=list)


def collect_pairs(
    source: nn.Module,
    batches: Sequence[torch.Tensor],
    block: Block,
    with_logits: bool = False,
    device: torch.device | None = None,
    progress: Progress | None = None,
    masks: Sequence[torch.Tensor] | None = None,
) -> Pairs:
    """h_start and h_{start+n} of the source on every batch (and h_L for its logits if asked, the final KL
    then counting the positions predicting a token marked in `masks`), kept on `device`."""
    n = len(decoder_layers(source))
    check_block(n, block.size, block.start)
    home = next(source.parameters()).device
    device = device or home
    end = block.start + block.size
    pairs = Pairs(inputs=[], targets=[], finals=[] if with_logits else None)
    with torch.inference_mode():
        for done, ids in enumerate(batches):
            wanted = [block.start, end, n] if with_logits else [block.start, end]
            h = residual_at_exits(source, ids.to(home), wanted)
            pairs.inputs.append(h[block.start].float().to(device))
            pairs.targets.append(h[end].float().to(device))
            if pairs.finals is not None:
                pairs.finals.append(h[n].float().to(device))
            if progress is not None:
                progress(done + 1, len(batches), "collect hidden states")
    # made outside inference mode: they index tensors that autograd tracks
    marks = masks if masks is not None else [None] * len(batches)
    pairs.where = [None if m is None else predicting(m).to(device) for m in marks]
    return pairs


def relative_mse(layer: nn.Module, model: nn.Module, pairs: Pairs) -> float:
    """sum ||R(h_i) - h_{i+n}||^2 / sum ||h_{i+n}||^2 over all cached windows."""
    err, norm = 0.0, 0.0
    with torch.inference_mode():
        for x, y in zip(pairs.inputs, pairs.targets, strict=True):
            out = _output(layer(x, **layer_inputs(model, x))).float()
            err += (out - y).square().sum().item()
            norm += y.square().sum().item()
    return err / norm


def fit_replacement(
    model: nn.Module,
    position: int,
    pairs: Pairs,
    options: FitOptions,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> FitReport:
    """Train layer `position` of `model` in place (all else frozen) on the cached pairs, cycled, one window
    per AdamW step, lr decaying linearly from options.lr to 0; the loss is the module docstring's.
    Runs on CUDA when available (or on `device`), then returns the model to where it was."""
    if not pairs.inputs:
        raise ValueError("need at least one window of hidden states")
    if options.kl_weight > 0 and pairs.finals is None:
        raise ValueError("the final KL needs the source's logits: collect_pairs(with_logits=True)")
    device = torch.device(device) if device is not None else default_device()
    home = next(model.parameters()).device
    model.to(device)
    layer = decoder_layers(model)[position]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in layer.parameters():
        p.requires_grad_(True)
    report = FitReport(steps=options.steps, device=str(device))
    report.mse_before = relative_mse(layer, model, pairs)
    scale = [y.square().mean().item() for y in pairs.targets]
    optimizer = torch.optim.AdamW(layer.parameters(), lr=options.lr, weight_decay=0.0)
    # lr decays linearly to 0 over the steps (steps=0: the copied layer is kept as it is, unfitted)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / max(options.steps, 1))
    try:
        layer.train()
        for step in range(options.steps):
            k = step % len(pairs.inputs)
            x, y = pairs.inputs[k].to(device), pairs.targets[k].to(device)
            out = _output(layer(x, **layer_inputs(model, x)))
            loss = (out.float() - y).square().mean() / scale[k]
            if options.kl_weight > 0:
                assert pairs.finals is not None
                where = pairs.where[k]
                with torch.no_grad():
                    teacher = head(model, pairs.finals[k].to(device), where)
                z = tail_logits(model, out, position + 1, where)
                loss = loss + options.kl_weight * masked_kd(z, teacher, options.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            report.losses.append(loss.item())
            if progress is not None:
                progress(step + 1, options.steps, f"fit replacement loss {loss.item():.4f}")
    finally:
        layer.eval()
        for p, wanted in frozen:
            p.requires_grad_(wanted)
    report.mse_after = relative_mse(layer, model, pairs)
    model.to(home)
    return report


@dataclass
class Replacement:
    model: nn.Module
    block: Block
    fit: FitReport
    block_influence: list[float] | None = None
    layer_influence: list[float] | None = None
    block_distance: list[float] | None = None  # D(i), with criterion "kl"


def replace_block(
    source: nn.Module,
    calibration: Sequence[torch.Tensor],
    size: int,
    fitting: Sequence[torch.Tensor] | None = None,
    options: FitOptions | None = None,
    random_seed: int | None = None,
    progress: Progress | None = None,
    device: torch.device | str | None = None,
    masks: Sequence[torch.Tensor] | None = None,
) -> Replacement:
    """A copy of `source` with a block of `size` layers replaced by one fitted layer; the source is untouched.

    The block is the one of lowest BI_size on `calibration` (criterion "influence") or of lowest D(i) on
    the first `options.search_windows` fitting windows (criterion "kl"), or `options.block_start`; or,
    with `random_seed`, a seeded random block and initial layer (the baseline). The replacement is fitted
    on `fitting` (default: the calibration windows); `masks` (one per fitting window) marks its response
    tokens, the ones D and the final KL count. Runs on CUDA when available (or on `device`); both models
    end where the source was.
    """
    options = options or FitOptions()
    n = len(decoder_layers(source))
    check_block(n, size, options.block_start)
    if fitting is None:
        fitting, masks = calibration, None
    if masks is not None and len(masks) != len(fitting):
        raise ValueError(f"{len(masks)} response masks for {len(fitting)} fitting windows")
    stage = _stages(progress, 4)
    distance = None
    device = torch.device(device) if device is not None else default_device()
    home = next(source.parameters()).device
    source.to(device)
    try:
        if random_seed is not None:
            block, bi = random_block(n, size, random_seed), None
        else:
            bi = block_influences(source, calibration, size, stage(0))
            if options.block_start is not None:
                inside = range(options.block_start, options.block_start + size)
                block = Block(options.block_start, size, max(inside, key=lambda j: (bi[1][j], -j)))
            elif options.criterion == "kl":
                k = options.search_windows
                searched = masks[:k] if masks is not None else None
                shortlist = sorted(range(len(bi[0])), key=lambda i: (bi[0][i], i))[: options.candidates]
                distance = block_distances(
                    source, fitting[:k], searched, size, bi[1], options.temperature, stage(1), shortlist
                )
                block = choose_block(distance, bi[1], size)
            else:
                block = choose_block(bi[0], bi[1], size)
        pairs = collect_pairs(source, fitting, block, options.kl_weight > 0, device, stage(2), masks)
    finally:
        source.to(home)
    pruned = cut_block(source, block)
    fit = fit_replacement(pruned, block.start, pairs, options, device, stage(3))
    return Replacement(
        model=pruned,
        block=block,
        fit=fit,
        block_influence=bi[0] if bi else None,
        layer_influence=bi[1] if bi else None,
        block_distance=distance,
    )


def _stages(progress: Progress | None, stages: int):
    """progress for phase `stage` of `stages`, each phase an equal share of the bar, named in the message."""

    def stage(index: int) -> Progress | None:
        if progress is None:
            return None
        return lambda done, total, message: progress(
            index * max(total, 1) + done, stages * max(total, 1), f"replace {index + 1}/{stages}: {message}"
        )

    return stage
