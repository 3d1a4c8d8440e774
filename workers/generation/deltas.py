"""Variants of a resident base as deltas behind the compact engine's linear layers: the one seam through
which a batch mixes variants of one base.

A variant v of a base is the base's weights plus, per tensor, a delta D_v in one of these forms:

- low rank:  D = B A             (B: out x r, A: r x in),  applied as  y += (x A^T) B^T
- int8 low rank: the same with A = diag(s) A_q (a scale per rank row) and B = B_q diag(c) (a scale per rank
             column), A_q, B_q in [-127, 127]: how a quantised engine (int8, int4 weights, bfloat16
             activations) holds low-rank deltas, at the base's own precision class
- dense:     D                   (in the activation dtype),  y += x D^T
- int8:      D = s_o q_oi        (per output channel, q in [-127, 127]),  y += x (s q)^T
- sparse:    D in CSR            (float32),  y += (D x^T)^T

For a batch whose rows r belong to variants v(r) (None: the base itself), every linear layer computes

    Y = X W^T (+ b)                                  once, for all rows (the base's matmul)
    Y[rows of v, slice] += D_v,slice(X[rows of v])   for each variant v present (its rows only)

where `slice` is the part of a fused projection (q, k, v of qkv; gate, up of gate_up) the delta belongs to.
Embedding rows add D_embed[ids]; norms a variant changed are applied per row with its own weights. With D
stored exactly (dense), a variant's rows compute what its full model computes, up to float rounding of
x (W + D)^T against x W^T + x D^T. Nothing here knows about requests, files or Redis.

How a layer's sum over the batch's variants is computed, fastest first: int8 low-rank deltas on the CPU in
one compiled call per layer (KernelPlan, workers.generation.lowrank_kernel), else in two int8 products
(Int8Stack); float low-rank deltas in one grouped float32 product; anything else variant by variant.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from workers.early_exit.adapters import ExitAdapters
from workers.generation.lowrank_kernel import KernelPlan, lowrank_kernel


class LinearDelta(Protocol):
    out_features: int
    bytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def rows(self, ids: torch.Tensor) -> torch.Tensor: ...


class LowRankDelta:
    """D = B A: y = (x A^T) B^T; rows(ids) = B[ids] A (an embedding delta)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"low-rank factors of shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
        self.a, self.b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        self.out_features, self.rank = b.shape[0], a.shape[0]
        self.bytes = (self.a.numel() + self.b.numel()) * self.a.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a), self.b)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.b) @ self.a


def int8_kernel_fits(device: torch.device, in_features: int) -> bool:
    """Whether torch's CPU int8 weight kernel (`_weight_int8pack_mm`) may multiply by a weight of this many
    input columns: it reads past the end of its input (a segmentation fault, measured with torch 2.13
    on AVX-512) for a number of columns that is not a multiple of 16 with most batch sizes."""
    return device.type == "cpu" and in_features % 16 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (.., in) times (diag(scale) q)^T for int8 q (out x in): torch's int8 weight kernel where it applies
    (the CPU, bfloat16 activations: what the int8 engine's own linears use), else q dequantised."""
    shape = x.shape
    if x.dtype == torch.bfloat16 and int8_kernel_fits(x.device, shape[-1]):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), q, scale)
        return y.view(*shape[:-1], q.shape[0])
    return F.linear(x, q.to(x.dtype)) * scale


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) with w ~= diag(s) q, q int8 in [-127, 127], one scale per row (zero rows: scale 1)."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous(), scale


class Int8LowRankDelta:
    """D = (B_q diag(c)) (diag(s) A_q), int8 factors: y = ((x (diag(s) A_q)^T) * c) B_q^T. Per rank row of A
    and per rank column of B, each scale covers one singular direction, so a quantised factor keeps its
    relative error near 1/254 of that direction's largest entry. B_q is held transposed (`qbt`, r x out:
    each direction's column contiguous, as the compiled kernel reads it)."""

    def __init__(
        self, qa: torch.Tensor, sa: torch.Tensor, qbt: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype
    ) -> None:
        self.qa, self.qbt = qa.contiguous(), qbt.contiguous()
        self.sa, self.sb = sa.to(dtype), sb.to(dtype)
        self.dtype = dtype
        self.out_features, self.rank = qbt.shape[1], qa.shape[0]
        scales = (self.sa.numel() + self.sb.numel()) * self.sa.element_size()
        self.bytes = self.qa.numel() + self.qbt.numel() + scales

    @property
    def qb(self) -> torch.Tensor:
        """B_q (out x r), a view."""
        return self.qbt.T

    @staticmethod
    def of(delta: LowRankDelta, dtype: torch.dtype) -> Int8LowRankDelta:
        qa, sa = _quantize_rows(delta.a)
        qbt, sb = _quantize_rows(delta.b.T)
        return Int8LowRankDelta(qa, sa, qbt, sb, dtype)

    def scaled(self, coefficient: float) -> Int8LowRankDelta:
        """c D, sharing the int8 factors."""
        return Int8LowRankDelta(self.qa, self.sa, self.qbt, self.sb * coefficient, self.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = int8_matmul(x, self.qa, self.sa.to(x.dtype)) * self.sb.to(x.dtype)
        ones = torch.ones(self.out_features, dtype=x.dtype, device=x.device)
        return int8_matmul(t, self.qb.contiguous(), ones)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        b = self.qbt.index_select(1, ids.reshape(-1)).T.to(self.dtype) * self.sb
        return (b @ (self.qa.to(self.dtype) * self.sa[:, None])).reshape(*ids.shape, -1)


class DenseDelta:
    """D itself, in the activation dtype."""

    def __init__(self, delta: torch.Tensor, dtype: torch.dtype) -> None:
        self.delta = delta.to(dtype).contiguous()
        self.out_features = delta.shape[0]
        self.bytes = self.delta.numel() * self.delta.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.delta)


class Int8Delta:
    """D = s_o q_oi, one scale per output row, dequantised per call of its rows' product."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.q, self.scale = q.to(torch.int8).contiguous(), scale.to(dtype).contiguous()
        self.dtype = dtype
        self.out_features = q.shape[0]
        self.bytes = self.q.numel() + self.scale.numel() * self.scale.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.q).to(self.dtype) * self.scale[ids][..., None]


class SparseDelta:
    """D in CSR (float32): y = (D x^T)^T."""

    def __init__(self, delta: torch.Tensor) -> None:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self.delta = delta.float().to_sparse_csr() if not delta.is_sparse_csr else delta.float()
        self.out_features = delta.shape[0]
        values = self.delta.values()
        index_bytes = self.delta.col_indices().numel() * 8 + self.delta.crow_indices().numel() * 8
        self.bytes = values.numel() * values.element_size() + index_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        y = torch.sparse.mm(self.delta, flat.T).T
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        picked = torch.stack([self.delta[int(i)].to_dense() for i in flat.tolist()])
        return picked.reshape(*ids.shape, -1)


@dataclass
class SliceDelta:
    """A delta on the output columns offset..offset+n of a (fused) linear layer, with an optional bias
    delta on them."""

    offset: int
    delta: LinearDelta | None
    bias: torch.Tensor | None = None

    @property
    def bytes(self) -> int:
        extra = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return (0 if self.delta is None else self.delta.bytes) + extra


@dataclass
class VariantDelta:
    """What a variant adds to its base in the compact engine's terms.

    `linears[(layer, slot)]` with slot one of qkv, o, gate_up, down (layer -1 and slot head: the LM head);
    `norms[(layer, which)]` with which one of input, post (layer -1, final): the variant's own norm
    weights, only where they differ from the base's; `embed`: a delta on the input embedding;
    `adapters`: the variant's own exit adapters (None: it uses its base's)."""

    name: str
    linears: dict[tuple[int, str], list[SliceDelta]] = field(default_factory=dict)
    norms: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    embed: LinearDelta | None = None
    adapters: ExitAdapters | None = None

    def combined(self, key: tuple[int, str], out_total: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A (R x in), B (out_total x R)) in float32 with B A = this layer's whole delta when every part
        of it is low rank without a bias (the slices' factors side by side), else None. Built for a batch
        (RowDeltas keeps it while the batch's rows stay), not here: it would double the variant's size."""
        parts = self.linears.get(key, [])
        if not parts or any(not isinstance(p.delta, LowRankDelta) or p.bias is not None for p in parts):
            return None
        a = torch.cat([p.delta.a.float() for p in parts])  # type: ignore[union-attr]
        b = torch.zeros(out_total, a.shape[0], device=a.device)
        start = 0
        for p in parts:
            rank, width = p.delta.rank, p.delta.out_features  # type: ignore[union-attr]
            b[p.offset : p.offset + width, start : start + rank] = p.delta.b.float()  # type: ignore[union-attr]
            start += rank
        return a, b

    def quantized(self, dtype: torch.dtype) -> VariantDelta:
        """This variant with its low-rank deltas held as int8 factors (Int8LowRankDelta) in a quantised
        engine of activation dtype `dtype`; other parts, norms and adapters as they are. A delta shared by
        two places (a tied head's and the embedding's) stays shared."""
        done: dict[int, object] = {}

        def q(delta):
            if not isinstance(delta, LowRankDelta):
                return delta
            if id(delta) not in done:
                done[id(delta)] = Int8LowRankDelta.of(delta, dtype)
            return done[id(delta)]

        out = VariantDelta(self.name, norms=self.norms, adapters=self.adapters)
        for key, parts in self.linears.items():
            out.linears[key] = [SliceDelta(p.offset, q(p.delta), p.bias) for p in parts]
        out.embed = q(self.embed)
        return out

    @property
    def bytes(self) -> int:
        """Bytes of the tensors this variant holds (a delta shared by two places counted once)."""
        seen = {id(p.delta) for parts in self.linears.values() for p in parts}
        total = sum(part.bytes for parts in self.linears.values() for part in parts)
        total += sum(w.numel() * w.element_size() for w in self.norms.values())
        if self.embed is not None and id(self.embed) not in seen:
            total += self.embed.bytes
        if self.adapters is not None:
            maps = self.adapters.maps.values()
            total += sum((a.weight.numel() + a.bias.numel()) * a.weight.element_size() for a in maps)
        return total


@dataclass
class Int8Stack:
    """A layer's int8 low-rank deltas for a batch: the factors of the batch's variants side by side,
    A (sum R x in) with row scales, B (out_total x sum R, zeros outside each slice), and per row the
    column scales c of its own variant's columns (zeros elsewhere: the base's rows and the other variants'
    columns), so Y += ((X A^T) * mask) B^T is every row's own delta in two int8 products."""

    a: torch.Tensor
    a_scale: torch.Tensor
    b: torch.Tensor
    ones: torch.Tensor
    mask: torch.Tensor  # (rows, sum R); (sum R,) when every row is one variant

    def applies(self, y: torch.Tensor, x: torch.Tensor) -> bool:
        return True

    def add(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = int8_matmul(x, self.a, self.a_scale)
        mask = self.mask[:, None] if x.dim() == 3 and self.mask.dim() == 2 else self.mask
        y += int8_matmul(t * mask, self.b, self.ones)
        return y


Groups = list[tuple[VariantDelta, torch.Tensor | None]]
Grouped = list[tuple[torch.Tensor | None, list[SliceDelta]]]  # (row index or None: every row, parts)


def _int8_parts(groups: Groups, parts_of: Callable[[VariantDelta], list[SliceDelta]]) -> Grouped | None:
    """Each group's row index with its parts, or None where some part is not int8 low rank (or has a bias)
    or no group has one."""
    grouped: Grouped = []
    for variant, index in groups:
        parts = parts_of(variant)
        if any(not isinstance(p.delta, Int8LowRankDelta) or p.bias is not None for p in parts):
            return None
        grouped.append((index, parts))
    return grouped if any(parts for _, parts in grouped) else None


def _kernel_plan(rows: int, grouped: Grouped, out_total: int) -> KernelPlan | None:
    """The compiled kernel's plan for the groups' int8 parts, or None where the kernel is not built or the
    batch is not on the CPU in bfloat16."""
    first: Int8LowRankDelta = next(parts[0] for _, parts in grouped if parts).delta  # type: ignore[assignment]
    if first.qa.device.type != "cpu" or first.dtype != torch.bfloat16:
        return None
    module = lowrank_kernel()
    if module is None:
        return None
    ranges = [(0, 0)] * rows
    start = 0
    for index, parts in grouped:
        width = sum(p.delta.rank for p in parts)  # type: ignore[union-attr]
        for row in range(rows) if index is None else index.tolist():
            ranges[row] = (start, start + width)
        start += width
    factors = [
        (p.offset, p.delta.qa, p.delta.sa, p.delta.qbt, p.delta.sb)  # type: ignore[union-attr]
        for _, parts in grouped
        for p in parts
    ]
    return KernelPlan.build(module, ranges, factors, out_total)


def _embed_parts(variant: VariantDelta) -> list[SliceDelta]:
    return [] if variant.embed is None else [SliceDelta(0, variant.embed)]


def _int8_stack(
    groups: Groups, rows: int, key: tuple[int, str], out_total: int
) -> Int8Stack | KernelPlan | None:
    """The stack of `key` for a batch's groups (the compiled kernel's plan where it is built and the batch
    is on the CPU in bfloat16), or None where some variant's delta there is not int8 low rank (or has a
    bias)."""
    grouped = _int8_parts(groups, lambda variant: variant.linears.get(key, []))
    if grouped is None:
        return None
    plan = _kernel_plan(rows, grouped, out_total)
    if plan is not None:
        return plan
    a_parts, sa_parts, b_blocks, masks = [], [], [], []
    for index, parts in grouped:
        for part in parts:
            d: Int8LowRankDelta = part.delta  # type: ignore[assignment]
            block = torch.zeros(out_total, d.rank, dtype=torch.int8, device=d.qa.device)
            block[part.offset : part.offset + d.out_features] = d.qb
            a_parts.append(d.qa)
            sa_parts.append(d.sa)
            b_blocks.append(block)
            masks.append((index, d.sb))
    a, a_scale, b = torch.cat(a_parts), torch.cat(sa_parts), torch.cat(b_blocks, dim=1)
    dtype = a_scale.dtype
    if len(groups) == 1 and groups[0][1] is None:
        mask = torch.cat([scale for _, scale in masks])
    else:
        mask = torch.zeros(rows, a.shape[0], dtype=dtype, device=a.device)
        start = 0
        for index, scale in masks:
            columns = slice(start, start + scale.shape[0])
            if index is None:
                mask[:, columns] = scale
            else:
                mask[index, columns] = scale
            start += scale.shape[0]
    pad = -a.shape[0] % 16  # zero rank columns up to the int8 kernel's inner size (int8_kernel_fits)
    a, a_scale = F.pad(a, (0, 0, 0, pad)).contiguous(), F.pad(a_scale, (0, pad), value=1.0)
    b, mask = F.pad(b, (0, pad)).contiguous(), F.pad(mask, (0, pad))
    return Int8Stack(a, a_scale, b, torch.ones(out_total, dtype=dtype, device=a.device), mask)


_Stack = tuple[torch.Tensor, torch.Tensor] | Int8Stack | KernelPlan


class RowDeltas:
    """The variants of a batch's rows: `variants[r]` is row r's variant (None: the base).

    Built once per batch (when its rows change), not per step: the groups of rows by variant, and per
    layer, on first use, the factors every decode step of the batch multiplies by."""

    def __init__(self, variants: list[VariantDelta | None], device: torch.device) -> None:
        self.variants = variants
        members: dict[int, tuple[VariantDelta, list[int]]] = {}
        for row, variant in enumerate(variants):
            if variant is not None:
                members.setdefault(id(variant), (variant, []))[1].append(row)
        rows = len(variants)
        self.groups: list[tuple[VariantDelta, torch.Tensor | None]] = [
            (variant, None if len(index) == rows else torch.tensor(index, device=device))
            for variant, index in members.values()
        ]
        # every row one variant: its factors once (2-D products), not a copy per row
        self.only = self.groups[0][0] if len(self.groups) == 1 and self.groups[0][1] is None else None
        self._norms: dict[tuple[int, str], torch.Tensor | None] = {}
        self._stacks: dict[tuple[int, str], _Stack | None] = {}
        self._embed_plan: KernelPlan | None | bool = False  # False: not built yet

    def _stack(self, key: tuple[int, str], out_total: int) -> _Stack | None:
        """The layer's combined low-rank factors: an Int8Stack (or the kernel's KernelPlan) where every
        variant's delta there is int8 low rank; else in float32, or None where some variant's delta there
        is not low rank (or has a bias): with one variant for every row, its (A (R x in), B (out_total x R));
        else per-row (rows, in, R), (rows, R, out_total) (zeros for the base's rows, ranks padded with
        zeros to the largest)."""
        int8 = _int8_stack(self.groups, len(self.variants), key, out_total)
        if int8 is not None:
            return int8
        combined = {}
        for variant, _ in self.groups:
            if variant.linears.get(key):
                factors = variant.combined(key, out_total)
                if factors is None:
                    return None
                combined[id(variant)] = factors
        if not combined:
            return None
        if self.only is not None:
            return combined[id(self.only)]
        rank = max(a.shape[0] for a, _ in combined.values())
        padded = {
            k: (F.pad(a, (0, 0, 0, rank - a.shape[0])).T, F.pad(b, (0, rank - b.shape[1])).T)
            for k, (a, b) in combined.items()
        }
        a_any, b_any = next(iter(padded.values()))
        zeros = (torch.zeros_like(a_any), torch.zeros_like(b_any))
        chosen = [padded.get(id(v), zeros) if v is not None else zeros for v in self.variants]
        return torch.stack([a for a, _ in chosen]), torch.stack([b for _, b in chosen])

    @staticmethod
    def of(variants: list[VariantDelta | None], device: torch.device) -> RowDeltas | None:
        """None when no row has a variant (the base's path, untouched)."""
        return RowDeltas(variants, device) if any(v is not None for v in variants) else None

    def linear(self, y: torch.Tensor, x: torch.Tensor, key: tuple[int, str]) -> torch.Tensor:
        """y (the base's output for x) plus each variant's delta on its rows, in place.

        Where every variant's delta on this layer is int8 low rank (a quantised engine), all rows go
        through one compiled call (KernelPlan) or two int8 products (Int8Stack). Where every one is low
        rank in float, through one grouped product in float32 whatever the number of variants:
        Y += (X A^T) B^T with one variant's factors when every row is that variant, else
        Y += (X A_rows) B_rows with per-row factors stacked (zeros for the base's rows), two batched
        matmuls. Otherwise each variant's rows are gathered in turn."""
        if key not in self._stacks:
            self._stacks[key] = self._stack(key, y.shape[-1])
        stack = self._stacks[key]
        if isinstance(stack, (Int8Stack, KernelPlan)):
            if stack.applies(y, x):
                return stack.add(y, x)
        elif stack is not None:
            a, b = stack
            if self.only is not None:
                y += F.linear(F.linear(x.float(), a), b)
            elif x.dim() == 3:
                y += torch.bmm(torch.bmm(x.float(), a), b)
            else:
                y += torch.bmm(torch.bmm(x.float()[:, None], a), b)[:, 0]
            return y
        for variant, index in self.groups:
            parts = variant.linears.get(key)
            if not parts:
                continue
            xs = x if index is None else x.index_select(0, index)
            for part in parts:
                width = part.delta.out_features if part.delta is not None else part.bias.shape[0]
                out = y[..., part.offset : part.offset + width]
                add = part.delta(xs) if part.delta is not None else None
                if part.bias is not None:
                    add = part.bias.expand(*xs.shape[:-1], width) if add is None else add + part.bias
                if index is None:
                    out += add.to(y.dtype)
                else:
                    out.index_add_(0, index, add.to(y.dtype))
        return y

    def embed(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """hidden (the base's embeddings of ids) plus each row's variant's embedding delta, in place: one
        compiled call where every variant's is int8 low rank, else each variant's rows in turn."""
        if self._embed_plan is False:
            grouped = _int8_parts(self.groups, _embed_parts)
            rows = len(self.variants)
            self._embed_plan = None if grouped is None else _kernel_plan(rows, grouped, hidden.shape[-1])
        plan = self._embed_plan
        if plan is not None and hidden.dtype is torch.bfloat16 and hidden.is_contiguous():
            return plan.add_rows(hidden, ids)
        for variant, index in self.groups:
            if variant.embed is None:
                continue
            if index is None:
                hidden += variant.embed.rows(ids).to(hidden.dtype)
            else:
                hidden.index_add_(0, index, variant.embed.rows(ids.index_select(0, index)).to(hidden.dtype))
        return hidden

    def norm_weight(self, key: tuple[int, str], base: torch.Tensor) -> torch.Tensor | None:
        """Per-row norm weights (B, 1, H) where some row's variant has its own, else None (the base's);
        with one variant for every row, its own weights (H) themselves."""
        if key not in self._norms:
            own = [v.norms.get(key) if v is not None else None for v in self.variants]
            if self.only is not None:
                weight = self.only.norms.get(key)
                self._norms[key] = None if weight is None else weight.to(base.dtype)
            elif all(w is None for w in own):
                self._norms[key] = None
            else:
                stacked = torch.stack([base if w is None else w.to(base.dtype) for w in own])
                self._norms[key] = stacked[:, None, :]
        return self._norms[key]


class VariantLayoutError(ValueError):
    """A delta names a tensor the base does not have, or has another shape than the base's tensor."""


_PROJECTIONS = {
    "self_attn.q_proj": ("qkv", 0),
    "self_attn.k_proj": ("qkv", 1),
    "self_attn.v_proj": ("qkv", 2),
    "self_attn.o_proj": ("o", 0),
    "mlp.gate_proj": ("gate_up", 0),
    "mlp.up_proj": ("gate_up", 1),
    "mlp.down_proj": ("down", 0),
}
_NORMS = {"input_layernorm": "input", "post_attention_layernorm": "post"}


def build_variant(
    name: str,
    compact,
    deltas: dict[str, LinearDelta | torch.Tensor],
    adapters: ExitAdapters | None = None,
) -> VariantDelta:
    """A VariantDelta over `compact` (a CompactLlama) from deltas named like Hugging Face tensors:
    a LinearDelta for a 2-D weight (model.layers.i.self_attn.q_proj.weight, model.embed_tokens.weight,
    lm_head.weight, ...), a tensor for a 1-D one (a norm's or bias's delta). An LM head tied to the
    embedding takes the embedding's delta. VariantLayoutError for a name or shape the base does not have."""
    variant = VariantDelta(name, adapters=adapters)
    sizes = {
        "qkv": lambda lay: _qkv_offsets(compact),
        "gate_up": lambda lay: (0, lay.gate_up.out_features // 2),
        "o": lambda lay: (0,),
        "down": lambda lay: (0,),
    }
    for tensor, delta in deltas.items():
        parts = tensor.split(".")
        if tensor == "model.embed_tokens.weight":
            _check_rows(tensor, delta, compact.embed_weight.shape)
            variant.embed = delta  # type: ignore[assignment]
            if compact.tied_head:
                variant.linears.setdefault((-1, "head"), []).append(SliceDelta(0, delta))  # type: ignore[arg-type]
            continue
        if tensor == "lm_head.weight" and compact.tied_head and "model.embed_tokens.weight" in deltas:
            continue  # the tied head takes the embedding's delta (a state dict lists the tensor twice)
        if tensor == "lm_head.weight" and not compact.tied_head:
            _check_rows(tensor, delta, (compact.head.out_features, compact.head.in_features))
            variant.linears.setdefault((-1, "head"), []).append(SliceDelta(0, delta))  # type: ignore[arg-type]
            continue
        if tensor == "model.norm.weight":
            variant.norms[(-1, "final")] = _own_norm(tensor, compact.final_norm, delta)
            continue
        if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
            i, module, kind = int(parts[2]), ".".join(parts[3:-1]), parts[-1]
            if i >= compact.num_layers or compact.layers[i].moe is not None and module.startswith("mlp"):
                raise VariantLayoutError(f"the base has no module for {tensor!r}")
            layer = compact.layers[i]
            if module in _NORMS and kind == "weight":
                base = layer.input_norm if module == "input_layernorm" else layer.post_norm
                variant.norms[(i, _NORMS[module])] = _own_norm(tensor, base, delta)
                continue
            if module in _PROJECTIONS and kind in ("weight", "bias"):
                slot, part = _PROJECTIONS[module]
                linear = getattr(layer, slot)
                offsets = sizes[slot](layer)
                offset = offsets[part]
                end = offsets[part + 1] if part + 1 < len(offsets) else linear.out_features
                if kind == "weight":
                    _check_rows(tensor, delta, (end - offset, linear.in_features))
                    variant.linears.setdefault((i, slot), []).append(SliceDelta(offset, delta))  # type: ignore[arg-type]
                else:
                    if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != (end - offset,):
                        raise VariantLayoutError(f"{tensor!r}: the base's bias has {end - offset} entries")
                    bias = delta.to(compact.dtype)
                    variant.linears.setdefault((i, slot), []).append(SliceDelta(offset, None, bias))
                continue
        raise VariantLayoutError(f"the base has no module for {tensor!r}")
    return variant


def _qkv_offsets(compact) -> tuple[int, int, int]:
    q = compact.num_heads * compact.head_dim
    return 0, q, q + compact.kv_heads * compact.head_dim


def _check_rows(tensor: str, delta: object, shape: tuple[int, ...] | torch.Size) -> None:
    if isinstance(delta, torch.Tensor):
        raise VariantLayoutError(f"{tensor!r} is a matrix: it needs a low-rank, dense, int8 or sparse delta")
    out = delta.out_features  # type: ignore[attr-defined]
    width = _in_features(delta)
    if out != shape[0] or (width is not None and width != shape[1]):
        raise VariantLayoutError(
            f"{tensor!r}: the delta is {out} x {width}, the base's tensor {tuple(shape)}"
        )


def _in_features(delta: object) -> int | None:
    for attr in ("a", "delta", "q"):
        tensor = getattr(delta, attr, None)
        if isinstance(tensor, torch.Tensor):
            return tensor.shape[-1]
    return None


def _own_norm(tensor: str, base: torch.Tensor, delta: object) -> torch.Tensor:
    if not isinstance(delta, torch.Tensor) or delta.shape != base.shape:
        raise VariantLayoutError(f"{tensor!r}: a norm's delta must be a vector of {base.shape[0]} entries")
    return (base.float() + delta.float().to(base.device)).to(base.dtype)


class ScaledDelta:
    """c D: another delta times a coefficient (no copy of its tensors)."""

    def __init__(self, delta: LinearDelta, coefficient: float) -> None:
        self.delta, self.coefficient = delta, coefficient
        self.out_features = delta.out_features
        self.bytes = 0  # shares the delta's tensors

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.delta(x) * self.coefficient

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.delta.rows(ids) * self.coefficient


class SumDelta:
    """D_1 + D_2 + ...: a composition's embedding delta."""

    def __init__(self, deltas: list[LinearDelta]) -> None:
        self.deltas = deltas
        self.out_features = deltas[0].out_features
        self.bytes = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return sum(d(x) for d in self.deltas)  # type: ignore[return-value]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return sum(d.rows(ids) for d in self.deltas)  # type: ignore[return-value]


def _scaled(delta: LinearDelta, coefficient: float) -> LinearDelta:
    if isinstance(delta, LowRankDelta):  # stays low rank: the grouped product still applies
        return LowRankDelta(delta.a, delta.b * coefficient, delta.a.dtype)
    if isinstance(delta, Int8LowRankDelta):
        return delta.scaled(coefficient)
    return ScaledDelta(delta, coefficient)


def compose(name: str, compact, terms: list[tuple[VariantDelta, float]]) -> VariantDelta:
    """The variant base + sum_i c_i D_i of variants of one base (a linear or task-arithmetic merge of
    them, exactly, without materialising a weight): every linear's parts side by side, scaled; norms
    base + sum_i c_i (own_i - base); embeddings summed. Exit adapters: the base's."""
    out = VariantDelta(name)
    for variant, c in terms:
        for key, parts in variant.linears.items():
            scaled = [
                SliceDelta(
                    p.offset,
                    None if p.delta is None else _scaled(p.delta, c),
                    None if p.bias is None else p.bias * c,
                )
                for p in parts
            ]
            out.linears.setdefault(key, []).extend(scaled)
    bases = {(-1, "final"): compact.final_norm}
    for i, layer in enumerate(compact.layers):
        bases[(i, "input")], bases[(i, "post")] = layer.input_norm, layer.post_norm
    for key in {k for variant, _ in terms for k in variant.norms}:
        base = bases[key].float()
        total = base.clone()
        for variant, c in terms:
            if key in variant.norms:
                total += c * (variant.norms[key].float() - base)
        out.norms[key] = total.to(bases[key].dtype)
    embeds = [_scaled(v.embed, c) for v, c in terms if v.embed is not None]
    if embeds:
        out.embed = embeds[0] if len(embeds) == 1 else SumDelta(embeds)
    return out
