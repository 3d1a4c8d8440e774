"""A variant stored as its base plus a compressed delta, chosen per tensor to meet an error budget.

For each tensor with D = W_variant - W_base (float32) and budget eps, the relative error of a form is
e = ||D - D_hat||_F / ||D||_F (0 for D = 0). Candidates for a matrix (smallest bytes that meets e <= eps
wins; dense always does):

- low_rank:  D_hat = B A, the truncated SVD (workers.lora.extract.low_rank_factors) at the smallest rank
             r <= max_rank with e <= eps  (e^2 = sum_{j>r} s_j^2 / sum_j s_j^2);
- sparse:    D_hat = mask * D, the k largest |D| (workers.merge.sparsify.magnitude_mask, TIES' trim), k the
             fewest entries with e <= eps  (e^2 = dropped energy / total energy);
- int8:      D_hat = s_o q_oi, q = round(D / s_o), s_o = max_i |D_oi| / 127;
- dense:     D itself (in the variant's dtype).

Vectors (norms, biases) are dense. Tensors equal to the base's are left out. Everything is written, one
tensor at a time, to `variant_delta.safetensors` with `variant_delta.json` (base id, budget, per tensor its
form, rank or density, error and bytes); `load_variant` builds the engine's VariantDelta from them and
`materialise` writes the full model back (base + D_hat). Nothing here knows about HTTP or Redis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from workers.generation.deltas import (
    DenseDelta,
    Int8Delta,
    LinearDelta,
    LowRankDelta,
    SparseDelta,
    VariantDelta,
    build_variant,
)
from workers.lora.extract import low_rank_factors
from workers.merge.sparsify import magnitude_mask
from workers.store.model_files import ModelFileError, contained, read_json
from workers.tensors.safetensors_io import (
    DELTA_META,
    DELTA_WEIGHTS,
    AppendingWriter,
    PlannedTensor,
    ShardedWriter,
    TensorReader,
    delta_base,
)

Form = Literal["low_rank", "sparse", "int8", "dense"]
FORMS: tuple[Form, ...] = ("low_rank", "sparse", "int8", "dense")
Progress = Callable[[int, int, str], None]


class DeltaError(ValueError):
    """A variant that cannot be stored as a delta of this base (missing tensor, other shape, not finite)."""


@dataclass
class TensorChoice:
    form: Form
    relative_error: float
    bytes: int
    rank: int | None = None
    density: float | None = None


@dataclass
class DeltaReport:
    base: str
    error_budget: float
    tensors: dict[str, TensorChoice] = field(default_factory=dict)
    bytes: int = 0
    base_bytes: int = 0

    def summary(self) -> dict[str, Any]:
        """What goes into the model's record: forms chosen, worst error, bytes against the base's."""
        counts: dict[str, int] = {}
        for choice in self.tensors.values():
            counts[choice.form] = counts.get(choice.form, 0) + 1
        worst = max((c.relative_error for c in self.tensors.values()), default=0.0)
        return {
            "base": self.base,
            "error_budget": self.error_budget,
            "forms": counts,
            "max_relative_error": round(worst, 6),
            "bytes": self.bytes,
            "bytes_vs_base": round(self.bytes / self.base_bytes, 6) if self.base_bytes else None,
        }


def _relative(error_sq: float, total_sq: float) -> float:
    return math.sqrt(max(error_sq, 0.0) / total_sq) if total_sq > 0 else 0.0


def choose(
    delta: torch.Tensor, budget: float, max_rank: int, forms: tuple[Form, ...], dtype: torch.dtype
) -> tuple[TensorChoice, dict[str, torch.Tensor]]:
    """The cheapest form of a 2-D delta within `budget` and the tensors that store it (see module doc)."""
    d = delta.float()
    total = float(d.double().square().sum())
    size = dtype.itemsize
    out, n = d.shape
    candidates: list[tuple[TensorChoice, Callable[[], dict[str, torch.Tensor]]]] = []
    if "dense" in forms or not forms:
        candidates.append((TensorChoice("dense", 0.0, d.numel() * size), lambda: {"delta": d.to(dtype)}))
    if "int8" in forms:
        scale = (d.abs().amax(dim=1) / 127.0).clamp(min=1e-30)
        q = (d / scale[:, None]).round().clamp(-127, 127)
        error = _relative(float((q * scale[:, None] - d).double().square().sum()), total)
        candidates.append(
            (
                TensorChoice("int8", error, q.numel() + out * 4),
                lambda q=q, scale=scale: {"q": q.to(torch.int8), "scale": scale},
            )
        )
    if "sparse" in forms:
        energy = d.reshape(-1).double().square().sort(descending=True).values
        kept = energy.cumsum(0)
        need = total * (1 - budget**2)
        k = int(torch.searchsorted(kept, torch.tensor([need], dtype=kept.dtype)).item()) + 1
        k = min(max(k, 1), d.numel())
        density = k / d.numel()
        sparse_bytes = k * (size + 4) + (out + 1) * 4
        if sparse_bytes < d.numel() * size:
            mask = magnitude_mask(d, density)
            error = _relative(float((d * ~mask).double().square().sum()), total)

            def sparse(mask=mask) -> dict[str, torch.Tensor]:
                csr = (d * mask).to_sparse_csr()
                return {
                    "crow": csr.crow_indices().to(torch.int32),
                    "col": csr.col_indices().to(torch.int32),
                    "values": csr.values().to(dtype),
                }

            candidates.append(
                (TensorChoice("sparse", error, sparse_bytes, density=round(density, 6)), sparse)
            )
    if "low_rank" in forms:
        s = torch.linalg.svdvals(d)
        tail = s.double().square().flip(0).cumsum(0).flip(0)  # tail[r] = sum_{j >= r} s_j^2
        fits = [r for r in range(1, min(max_rank, len(s)) + 1) if r == len(s) or tail[r] <= budget**2 * total]
        if fits and fits[0] * (out + n) < d.numel():
            a, b, error = low_rank_factors(d, fits[0], 0.0)
            candidates.append(
                (
                    TensorChoice("low_rank", error, fits[0] * (out + n) * size, rank=fits[0]),
                    lambda a=a, b=b: {"lora_A": a.to(dtype), "lora_B": b.to(dtype)},
                )
            )
    within = [c for c in candidates if c[0].relative_error <= budget + 1e-9] or candidates[:1]
    choice, make = min(within, key=lambda c: c[0].bytes)
    return choice, make()


def compress_variant(
    base_dir: Path,
    model_dir: Path,
    out_dir: Path,
    *,
    base_id: str,
    error_budget: float = 0.05,
    max_rank: int = 64,
    forms: tuple[Form, ...] = FORMS,
    progress: Progress | None = None,
) -> DeltaReport:
    """Write `out_dir`/variant_delta.{safetensors,json} for the model at `model_dir` over `base_dir`.

    DeltaError (nothing written) when a tensor is missing from the base, has another shape or dtype
    class, is not finite, or a non-floating tensor differs."""
    if not 0 <= error_budget < 1:
        raise DeltaError(f"error_budget must lie in [0, 1), got {error_budget}")
    report = DeltaReport(base_id, error_budget)
    out_dir.mkdir(parents=True, exist_ok=True)
    with TensorReader(model_dir) as model, TensorReader(base_dir) as base:
        missing = sorted(set(base.entries) - set(model.entries))
        if missing:
            raise DeltaError(f"the variant lacks the base's tensor {missing[0]!r}")
        report.base_bytes = sum(e.nbytes for e in base.entries.values())
        writer = AppendingWriter(out_dir / DELTA_WEIGHTS)
        try:
            names = model.names
            for i, name in enumerate(names):
                entry = model.entries[name]
                base_entry = base.entries.get(name)
                if base_entry is None or tuple(base_entry.shape) != tuple(entry.shape):
                    shown = "no such tensor" if base_entry is None else f"shape {tuple(base_entry.shape)}"
                    raise DeltaError(
                        f"tensor {name!r} of shape {tuple(entry.shape)} does not match the base ({shown})"
                    )
                theta, theta0 = model.load(name), base.load(name)
                if not entry.dtype.is_floating_point:
                    if not torch.equal(theta, theta0):
                        raise DeltaError(f"tensor {name!r} is not floating point and differs from the base")
                    continue
                if not bool(torch.isfinite(theta).all()):
                    raise DeltaError(f"tensor {name!r} holds NaN or infinite values")
                delta = theta.float() - theta0.float()
                if not bool(delta.any()):
                    continue
                if delta.dim() == 2:
                    choice, parts = choose(delta, error_budget, max_rank, forms, entry.dtype)
                else:
                    choice = TensorChoice("dense", 0.0, delta.numel() * entry.dtype.itemsize)
                    parts = {"delta": delta.to(entry.dtype)}
                for part, tensor in parts.items():
                    writer.write(f"{name}:{part}", tensor)
                report.tensors[name] = choice
                report.bytes += choice.bytes
                if progress:
                    progress(i + 1, len(names), f"{i + 1}/{len(names)} tensors compressed")
            writer.close()
        except BaseException:
            writer.abort()
            (out_dir / DELTA_WEIGHTS).unlink(missing_ok=True)
            raise
    meta = {
        "base": base_id,
        "error_budget": error_budget,
        "bytes": report.bytes,
        "base_bytes": report.base_bytes,
        "tensors": {name: vars(choice) for name, choice in report.tensors.items()},
    }
    (out_dir / DELTA_META).write_text(json.dumps(meta, indent=1))
    return report


def describe_delta(model_dir: Path) -> dict[str, Any]:
    """The registry fields of a model stored as a delta (`base_model`, and `delta`: forms chosen, worst
    error, bytes against the base's); {} for a plain model. A job passes `describe_with` = model_store's
    describe merged with this, after `compress_variant` wrote the delta into the model's directory."""
    base = delta_base(model_dir)
    if base is None:
        return {}
    meta = read_json(model_dir, DELTA_META)
    report = DeltaReport(base, float(meta["error_budget"]), bytes=int(meta["bytes"]))
    report.base_bytes = int(meta["base_bytes"])
    report.tensors = {name: TensorChoice(**choice) for name, choice in meta["tensors"].items()}
    return {"base_model": base, "delta": report.summary()}


def decoded_delta(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """D_hat (float32) from a tensor's stored parts."""
    if "lora_A" in parts:
        return parts["lora_B"].float() @ parts["lora_A"].float()
    if "q" in parts:
        return parts["q"].float() * parts["scale"].float()[:, None]
    if "values" in parts:
        crow, col = parts["crow"].long(), parts["col"].long()
        return torch.sparse_csr_tensor(crow, col, parts["values"].float(), shape).to_dense()
    return parts["delta"].float().reshape(shape)


def read_parts(model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each stored tensor's parts, by tensor name, read from variant_delta.safetensors."""
    path = contained(model_dir, DELTA_WEIGHTS)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path).items():
        name, _, part = key.rpartition(":")
        if not name:
            raise ModelFileError(f"{DELTA_WEIGHTS}: tensor {key[:80]!r} is not <name>:<part>")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"{DELTA_WEIGHTS}: {name[:80]!r} holds NaN or infinite values")
        out.setdefault(name, {})[part] = tensor
    return out


def linear_delta(parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> LinearDelta:
    """The engine's form of one stored matrix delta, in the activation dtype."""
    if "lora_A" in parts:
        return LowRankDelta(parts["lora_A"].float(), parts["lora_B"].float(), dtype)
    if "q" in parts:
        return Int8Delta(parts["q"], parts["scale"].float(), dtype)
    if "values" in parts:
        crow, col = parts["crow"].long(), parts["col"].long()
        return SparseDelta(torch.sparse_csr_tensor(crow, col, parts["values"].float(), shape))
    return DenseDelta(parts["delta"].float().reshape(shape), dtype)


def load_variant(model_dir: Path, name: str, compact, adapters=None) -> VariantDelta:
    """The engine's VariantDelta of a model stored as a delta, over `compact` (its base's CompactLlama)."""
    shapes = _shapes(compact)
    deltas: dict[str, Any] = {}
    for tensor, parts in read_parts(model_dir).items():
        if "delta" in parts and parts["delta"].dim() == 1:
            deltas[tensor] = parts["delta"].float()
            continue
        shape = shapes.get(tensor)
        if shape is None and "delta" in parts:
            shape = tuple(parts["delta"].shape)
        if shape is None:
            raise ModelFileError(f"{DELTA_WEIGHTS}: the base has no tensor {tensor[:80]!r}")
        deltas[tensor] = linear_delta(parts, shape, compact.dtype)
    return build_variant(name, compact, deltas, adapters)


def _shapes(compact) -> dict[str, tuple[int, int]]:
    """Hugging Face names and shapes of the base's matrices (what a sparse delta needs to be rebuilt)."""
    q_out = compact.num_heads * compact.head_dim
    kv_out = compact.kv_heads * compact.head_dim
    shapes: dict[str, tuple[int, int]] = {
        "model.embed_tokens.weight": tuple(compact.embed_weight.shape),
        "lm_head.weight": (compact.head.out_features, compact.head.in_features),
    }
    for i, layer in enumerate(compact.layers):
        prefix = f"model.layers.{i}."
        hidden = layer.qkv.in_features
        shapes[prefix + "self_attn.q_proj.weight"] = (q_out, hidden)
        shapes[prefix + "self_attn.k_proj.weight"] = (kv_out, hidden)
        shapes[prefix + "self_attn.v_proj.weight"] = (kv_out, hidden)
        shapes[prefix + "self_attn.o_proj.weight"] = (layer.o.out_features, layer.o.in_features)
        if layer.gate_up is not None and layer.down is not None:
            inter = layer.gate_up.out_features // 2
            shapes[prefix + "mlp.gate_proj.weight"] = (inter, hidden)
            shapes[prefix + "mlp.up_proj.weight"] = (inter, hidden)
            shapes[prefix + "mlp.down_proj.weight"] = (layer.down.out_features, layer.down.in_features)
    return shapes


def materialise(base_dir: Path, delta_dir: Path, out_dir: Path, max_shard_bytes: int = 2 << 30) -> None:
    """Write the full model base + D_hat into `out_dir` (weights only), tensor by tensor."""
    parts = read_parts(delta_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with TensorReader(base_dir) as base:
        entries = base.entries
        unknown = sorted(set(parts) - set(entries))
        if unknown:
            raise DeltaError(f"the delta names {unknown[0]!r}, which the base lacks")
        plan = [PlannedTensor(n, e.dtype, e.shape) for n, e in entries.items()]
        writer = ShardedWriter(out_dir, plan, max_shard_bytes)
        try:
            for name, entry in entries.items():
                theta = base.load(name)
                if name in parts:
                    theta = (theta.float() + decoded_delta(parts[name], tuple(entry.shape))).to(entry.dtype)
                writer.write(name, theta)
            writer.close()
        except BaseException:
            writer.abort()
            raise
