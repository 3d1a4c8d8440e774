"""A PEFT LoRA adapter directory as a variant of its base, served without merging.

For a module m with LoRA factors A (r x in), B (out x r), PEFT computes y = x W^T + s_m x A^T B^T with
s_m = alpha_m / r_m (alpha_m / sqrt(r_m) with use_rslora), r_m and alpha_m from rank_pattern / alpha_pattern
where a pattern matches the module's name (PEFT's rule: the name ends with the pattern, at a dot), else
r and lora_alpha. So the module's delta is D = (s_m B) A, stored low rank as (A, s_m B); an embedding's
LoRA (lora_embedding_A: r x vocab, lora_embedding_B: dim x r) is D = s (B A)^T = A^T (s B)^T; a LoRA bias
(lora_B.bias) is a bias delta; a module saved whole (modules_to_save) is D = W_saved - W_base, dense.

`adapter_to_delta` checks everything against the base before writing anything: adapter_config.json must
be a LORA config PEFT would load without DoRA, every tensor must name a module the base has, with factor
shapes that chain with the base's weight, and hold finite numbers. It writes the variant_delta files of
workers.variants_delta, so the inference worker serves an adapter like any delta-stored variant.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from workers.lora.extract import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from workers.store.model_files import ModelFileError, contained, read_json, shown
from workers.tensors.safetensors_io import AppendingWriter, TensorReader, read_header
from workers.variants_delta import DELTA_META, DELTA_WEIGHTS

PREFIX = "base_model.model."
MAX_RANK = 4096


class AdapterError(ValueError):
    """An adapter that does not fit its base or is not a LoRA adapter PEFT would load."""


def _number(config: dict, key: str, default: float | None = None) -> float:
    value = config.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise AdapterError(f"{ADAPTER_CONFIG}: {key} must be a positive number")
    return float(value)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        config = read_json(adapter_dir, ADAPTER_CONFIG)
    except ModelFileError as e:
        raise AdapterError(str(e)) from e
    if not isinstance(config, dict):
        raise AdapterError(f"{ADAPTER_CONFIG} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{ADAPTER_CONFIG}: peft_type {shown(config.get('peft_type'))} is not LORA")
    if config.get("use_dora"):
        raise AdapterError(f"{ADAPTER_CONFIG}: DoRA adapters are not supported")
    rank = _number(config, "r", 8)
    if rank != int(rank) or rank > MAX_RANK:
        raise AdapterError(f"{ADAPTER_CONFIG}: r must be an integer up to {MAX_RANK}")
    _number(config, "lora_alpha", 8)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
            raise AdapterError(f"{ADAPTER_CONFIG}: {key} must map module names to numbers")
        for name in pattern:
            _number(pattern, name)
    return config


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{re.escape(key)}", module):
            return float(value)
    return default


def scaling(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(r_m, s_m) of a module (module docstring)."""
    rank = int(_pattern_value(config.get("rank_pattern") or {}, module, float(config.get("r", 8))))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, float(config.get("lora_alpha", 8)))
    root = math.sqrt(rank) if config.get("use_rslora") else rank
    return rank, alpha / root


def adapter_to_delta(adapter_dir: Path, base_dir: Path, out_dir: Path, *, base_id: str) -> dict[str, Any]:
    """Write out_dir/variant_delta.{safetensors,json} for a PEFT LoRA adapter over `base_dir`; the delta
    summary (as workers.variants_delta.describe_delta gives it). AdapterError when it does not fit."""
    config = read_adapter_config(adapter_dir)
    try:
        weights = contained(adapter_dir, ADAPTER_WEIGHTS)
        read_header(weights)  # validates offsets, dtypes and sizes before anything is loaded
    except ModelFileError as e:
        raise AdapterError(str(e)) from e
    tensors = load_file(weights)
    with TensorReader(base_dir) as base:
        entries = base.entries
        base_bytes = sum(e.nbytes for e in entries.values())
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            if not key.startswith(PREFIX):
                raise AdapterError(f"adapter tensor {shown(key)} does not start with {PREFIX!r}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"adapter tensor {shown(key)} holds NaN or infinite values")
            name = key.removeprefix(PREFIX)
            match = re.fullmatch(
                r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                r"lora_embedding_B|weight|bias)",
                name,
            )
            if match is None:
                raise AdapterError(f"adapter tensor {shown(key)} is not a LoRA factor or a saved module")
            modules.setdefault(match.group(1), {})[match.group(2)] = tensor
        out: dict[str, torch.Tensor] = {}
        forms: dict[str, dict[str, Any]] = {}
        embed = "model.embed_tokens.weight"
        for module, parts in modules.items():
            weight = f"{module}.weight"
            if (
                module == "lm_head"
                and weight not in entries
                and embed in entries
                and set(parts) == {"weight"}
            ):
                if "model.embed_tokens" in modules:  # a tied head: the embedding's delta is its delta
                    continue
                module, weight = "model.embed_tokens", embed
            if weight not in entries:
                raise AdapterError(
                    f"the adapter targets module {shown(module)}, which the base does not have"
                )
            shape = tuple(entries[weight].shape)
            rank, factor = scaling(config, module)
            if "lora_A.weight" in parts or "lora_B.weight" in parts:
                a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
                if a is None or b is None or a.dim() != 2 or b.dim() != 2 or len(shape) != 2:
                    raise AdapterError(f"module {shown(module)}: lora_A and lora_B must both be matrices")
                if a.shape != (rank, shape[1]) or b.shape != (shape[0], rank):
                    raise AdapterError(
                        f"module {shown(module)}: factors {tuple(b.shape)} x {tuple(a.shape)} do not fit the "
                        f"base's {shape} at rank {rank}"
                    )
                out[f"{weight}:lora_A"] = a.float()
                out[f"{weight}:lora_B"] = b.float() * factor
                forms[weight] = {"form": "low_rank", "rank": rank, "relative_error": 0.0, "bytes": 0}
                if "lora_B.bias" in parts:
                    bias = parts["lora_B.bias"]
                    if f"{module}.bias" not in entries or bias.shape != (shape[0],):
                        raise AdapterError(f"module {shown(module)}: its LoRA bias does not fit the base")
                    out[f"{module}.bias:delta"] = bias.float() * factor
            elif "lora_embedding_A" in parts:
                a, b = parts["lora_embedding_A"], parts.get("lora_embedding_B")
                if b is None or a.shape != (rank, shape[0]) or b.shape != (shape[1], rank):
                    raise AdapterError(f"module {shown(module)}: its embedding factors do not fit the base")
                out[f"{weight}:lora_A"] = (b.float() * factor).T.contiguous()
                out[f"{weight}:lora_B"] = a.float().T.contiguous()
                forms[weight] = {"form": "low_rank", "rank": rank, "relative_error": 0.0, "bytes": 0}
            for kind in ("weight", "bias"):
                if kind in parts:
                    target = f"{module}.{kind}"
                    if target not in entries or tuple(parts[kind].shape) != tuple(entries[target].shape):
                        raise AdapterError(f"saved module {shown(module)} does not match the base's {kind}")
                    out[f"{target}:delta"] = parts[kind].float() - base.load(target).float()
                    forms[target] = {"form": "dense", "relative_error": 0.0, "bytes": 0}
    if not forms:
        raise AdapterError("the adapter holds no LoRA factors")
    for part, tensor in out.items():
        name = part.rpartition(":")[0]
        if name in forms:
            forms[name]["bytes"] += tensor.numel() * tensor.element_size()
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = AppendingWriter(out_dir / DELTA_WEIGHTS)
    try:
        for part, tensor in out.items():
            writer.write(part, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    total = sum(t.numel() * t.element_size() for t in out.values())
    meta = {"base": base_id, "error_budget": 0.0, "bytes": total, "base_bytes": base_bytes, "tensors": forms}
    (out_dir / DELTA_META).write_text(json.dumps(meta, indent=1))
    return meta
