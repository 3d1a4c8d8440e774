"""Every row's own low-rank delta in one compiled call per linear layer (`lowrank_rows.cpp`), for batches
that mix variants of a quantised base (workers.generation.deltas.Int8Stack).

The torch formulation of the same sum, two int8 products and a mask per layer, spends its time in per-call
overhead at decode batch sizes (about 35 us a layer call on the 2-core CPU); the compiled loop reads each
row's own factors once (about 9 us). Built once per machine (workers.generation.cpp_build); where it cannot
be built (no compiler) or STRATA_LOWRANK_KERNEL=0, `lowrank_kernel()` is None and the torch products serve.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from workers.generation import cpp_build

SOURCE = Path(__file__).with_name("lowrank_rows.cpp")
SWITCH = "STRATA_LOWRANK_KERNEL"


def lowrank_kernel() -> ModuleType | None:
    """The compiled module (with `lowrank_rows`, `lowrank_embed`), loaded or built once per process; None
    where it is off or cannot be built, or (asked again later) while another process builds it."""
    return cpp_build.compiled(SOURCE, SWITCH)


class KernelPlan:
    """A layer's int8 low-rank deltas for one batch in the kernel's terms (lowrank_rows.cpp): rank
    directions j (rows of `a`, scales sa, sb), each with its int8 column at bvals[bstart[j]:][:width[j]]
    placed at output offset off[j]; request row r uses directions c0[r]..c1[r] - 1 (none for the base's
    rows). The kernel checks every bound of the plan before it reads."""

    def __init__(self, module, tensors: tuple[torch.Tensor, ...], out_features: int) -> None:
        self.module, self.tensors, self.out_features = module, tensors, out_features

    @staticmethod
    def build(
        module,
        row_ranges: list[tuple[int, int]],
        parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        out_features: int,
    ) -> KernelPlan:
        """From the batch rows' direction ranges and the parts side by side: (offset, qa (r x in),
        sa (r), qbt (r x width, contiguous), sb (r)) each, in the order the ranges count them."""
        bvals, bstart, off, width, start = [], [], [], [], 0
        for offset, _, _, qbt, _ in parts:
            rank, w = qbt.shape
            bvals.append(qbt.reshape(-1))
            bstart += [start + k * w for k in range(rank)]
            off += [offset] * rank
            width += [w] * rank
            start += rank * w
        ints = bstart + off + width + [lo for lo, _ in row_ranges] + [hi for _, hi in row_ranges]
        scales = torch.cat([torch.cat([p[2] for p in parts]), torch.cat([p[4] for p in parts])])
        tensors = (
            torch.cat([p[1] for p in parts]).contiguous(),
            torch.cat(bvals),
            torch.tensor(ints, dtype=torch.long),
            scales.float().contiguous(),
        )
        return KernelPlan(module, tensors, out_features)

    def applies(self, y: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether `add` takes these (the kernel checks every size itself)."""
        return (
            x.dtype is torch.bfloat16
            and y.dtype is torch.bfloat16
            and y.is_contiguous()
            and x.shape[:-1] == y.shape[:-1]
            and y.shape[-1] == self.out_features
        )

    def add(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y += every row's own delta of x, in place (`applies` must hold)."""
        q = x.shape[1] if x.dim() == 3 else 1
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        self.module.lowrank_rows(y.view(-1, self.out_features), flat, *self.tensors, q)
        return y

    def add_rows(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """hidden (rows, q, H) += every row's own embedding delta at token ids (rows, q), in place; the
        plan's parts are embedding deltas (offset 0, width the vocabulary)."""
        flat = hidden.view(-1, hidden.shape[-1])
        self.module.lowrank_embed(flat, ids.reshape(-1).contiguous(), *self.tensors, ids.shape[-1])
        return hidden
