"""Exit adapters: one fitted affine map per exit, applied to the residual stream before the shared norm,
and a scale after it.

For an exit at depth k < L with an adapter (A_k, b_k, s_k), the logits are

    logits_k = LMHead(s_k FinalNorm(A_k h_k + b_k))

and without one (or at full depth, which never has one) LMHead(FinalNorm(h_k)). The maps are fitted so that
A_k h_k + b_k approximates h_L (a "tuned lens", arXiv 2303.08112). The final norm takes away the scale of
A_k h_k + b_k, so the map alone cannot say how sure an exit should be; s_k (an inverse temperature: the head
is linear, so the logits are scaled by s_k) gives it back. How they are fitted lives elsewhere.

An exit may also have a pointer (`workers/early_exit/pointer.py`): a cache over the exit's own states mixed
into its distribution while a sequence is decoded or scored. It needs the context, so `head_input` does not
apply it; the engine and `measure_quality` do.

Stored with the model as `exit_adapters.safetensors` in its directory: tensors `exit.{k}.weight` (d x d),
`exit.{k}.bias` (d), `exit.{k}.scale` (1; absent in older files, meaning 1) and `exit.{k}.pointer` (theta and
the prior; absent: no pointer), float32, plus metadata (`format`, `num_layers`, `hidden_size`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workers.early_exit.pointer import ExitPointer

FILENAME = "exit_adapters.safetensors"
FORMAT = "strata-exit-adapters-v1"
MAX_SCALE = 100.0  # bounds of a stored scale (an inverse temperature): (0, MAX_SCALE]


@dataclass(frozen=True)
class Affine:
    """h -> h @ weight.T + bias, weight (d, d), bias (d,); `scale` multiplies the exit's normed state."""

    weight: torch.Tensor
    bias: torch.Tensor
    scale: float = 1.0
    pointer: ExitPointer | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(device=hidden.device, dtype=hidden.dtype)
        bias = self.bias.to(device=hidden.device, dtype=hidden.dtype)
        return torch.nn.functional.linear(hidden, weight, bias)


class ExitAdapters:
    """The adapters of one model, by exit depth (1 <= k < num_layers)."""

    def __init__(self, maps: Mapping[int, Affine], num_layers: int, hidden_size: int) -> None:
        for depth, affine in maps.items():
            if not 1 <= depth < num_layers:
                raise ValueError(f"an exit adapter must be at depth 1..{num_layers - 1}, got {depth}")
            shapes = (tuple(affine.weight.shape), tuple(affine.bias.shape))
            if shapes != ((hidden_size, hidden_size), (hidden_size,)):
                raise ValueError(f"exit adapter {depth} has shapes {shapes}, not for d={hidden_size}")
            if not (torch.isfinite(affine.weight).all() and torch.isfinite(affine.bias).all()):
                raise ValueError(f"exit adapter {depth} has non-finite values")
            if not (math.isfinite(affine.scale) and 0 < affine.scale <= MAX_SCALE):
                raise ValueError(f"exit adapter {depth} has a scale outside (0, {MAX_SCALE:g}]")
        self.maps = dict(sorted(maps.items()))
        self.num_layers, self.hidden_size = num_layers, hidden_size

    @property
    def depths(self) -> list[int]:
        return list(self.maps)

    def has(self, depth: int) -> bool:
        return depth in self.maps

    def pointer(self, depth: int) -> ExitPointer | None:
        affine = self.maps.get(depth)
        return affine.pointer if affine is not None else None

    def head_input(
        self, hidden: torch.Tensor, depth: int, norm: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """What the LM head reads at exit `depth`: s_k norm(A_k h + b_k) where there is an adapter, norm(h)
        elsewhere (full depth included, bit for bit)."""
        affine = self.maps.get(depth)
        if affine is None:
            return norm(hidden)
        normed = norm(affine(hidden))
        return normed if affine.scale == 1.0 else normed * affine.scale

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> ExitAdapters:
        maps = {
            k: replace(a, weight=a.weight.to(device, dtype), bias=a.bias.to(device, dtype))
            for k, a in self.maps.items()
        }
        return ExitAdapters(maps, self.num_layers, self.hidden_size)

    def without_pointers(self) -> ExitAdapters:
        """The same adapters with no exit's pointer: each exit's affine map and scale alone."""
        maps = {k: replace(a, pointer=None) for k, a in self.maps.items()}
        return ExitAdapters(maps, self.num_layers, self.hidden_size)

    def subset(self, depths: Iterable[int]) -> ExitAdapters:
        keep = set(depths)
        maps = {k: a for k, a in self.maps.items() if k in keep}
        return ExitAdapters(maps, self.num_layers, self.hidden_size)

    def save(self, model_dir: str | Path, extra_metadata: Mapping[str, object] | None = None) -> Path:
        """Write `exit_adapters.safetensors` into the model directory (via a temporary file, then rename)."""
        path = Path(model_dir) / FILENAME
        tensors: dict[str, torch.Tensor] = {}
        for depth, affine in self.maps.items():
            tensors[f"exit.{depth}.weight"] = affine.weight.detach().to("cpu", torch.float32).contiguous()
            tensors[f"exit.{depth}.bias"] = affine.bias.detach().to("cpu", torch.float32).contiguous()
            tensors[f"exit.{depth}.scale"] = torch.tensor([affine.scale], dtype=torch.float32)
            if affine.pointer is not None:
                tensors[f"exit.{depth}.pointer"] = affine.pointer.as_tensor()
        metadata = {
            "format": FORMAT,
            "num_layers": str(self.num_layers),
            "hidden_size": str(self.hidden_size),
        }
        if extra_metadata:
            metadata["recipe"] = json.dumps(dict(extra_metadata), sort_keys=True, default=str)
        partial = path.with_name(f".{FILENAME}.partial")
        save_file(tensors, str(partial), metadata=metadata)
        partial.replace(path)
        return path


def load_adapters(model_dir: str | Path, num_layers: int, hidden_size: int) -> ExitAdapters | None:
    """The adapters stored in a model directory, or None when it has none. Raises ValueError when the file
    does not match the model (wrong format, sizes, depths, non-finite values)."""
    path = Path(model_dir) / FILENAME
    if not path.is_file():
        return None
    maps: dict[int, Affine] = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{FILENAME} is not a Strata exit-adapter file")
        names = set(f.keys())
        for name in names:
            parts = name.split(".")
            well_formed = len(parts) == 3 and parts[0] == "exit" and parts[1].isdigit()
            if not well_formed or parts[2] not in ("weight", "bias", "scale", "pointer"):
                raise ValueError(f"{FILENAME} has an unexpected tensor {name[:64]!r}")
        depths = sorted({int(name.split(".")[1]) for name in names})
        for depth in depths:
            if {f"exit.{depth}.weight", f"exit.{depth}.bias"} - names:
                raise ValueError(f"{FILENAME}: exit {depth} lacks its weight or bias")
            scale = 1.0
            if f"exit.{depth}.scale" in names:
                stored = f.get_tensor(f"exit.{depth}.scale")
                if stored.numel() != 1:
                    raise ValueError(f"{FILENAME}: exit {depth} has {stored.numel()} scales, not 1")
                scale = float(stored.float())
            pointer = None
            if f"exit.{depth}.pointer" in names:
                pointer = ExitPointer.from_tensor(f.get_tensor(f"exit.{depth}.pointer"))
            weight = f.get_tensor(f"exit.{depth}.weight").float()
            maps[depth] = Affine(weight, f.get_tensor(f"exit.{depth}.bias").float(), scale, pointer)
    return ExitAdapters(maps, num_layers, hidden_size)
