"""Running mergekit 0.1.5 in-process on a YAML and comparing its tensors with Strata's, for parity tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.tiny_models import make_tiny_llama, make_variant


def mergekit_available() -> bool:
    try:
        import mergekit.merge  # noqa: F401
    except ImportError:
        return False
    return True


def run_mergekit(text: str, out: Path) -> None:
    """mergekit-yaml's merge, in this process (its import costs seconds; each merge a fraction of one)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions(
        allow_crimes=True, lazy_unpickle=False, quiet=True, copy_tokenizer=False, write_model_card=False
    )
    run_merge(config, str(out), options)


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def max_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))[:5]
    return max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)


def num_layers(directory: Path) -> int:
    return json.loads((directory / "config.json").read_text())["num_hidden_layers"]


def _rewrite(source: Path, target: Path, change) -> None:
    shutil.copytree(source, target)
    weights = load_file(source / "model.safetensors")
    save_file(
        {k: change(k, w) for k, w in weights.items()}, target / "model.safetensors", metadata={"format": "pt"}
    )


def make_parity_family(root: Path, tied: bool) -> dict[str, Path]:
    """base; fine-tune-like variants a, b, c; `double` = 2 * base (colinear with it, and with a zero task
    vector's worth of direction); `zeroed` = a with some tensors all zero (zero norms)."""
    make_tiny_llama(root / "base", seed=0, tie_word_embeddings=tied)
    for name, seed, scale in (("a", 1, 0.01), ("b", 2, 0.02), ("c", 3, 0.015)):
        make_variant(root / "base", root / name, seed=seed, scale=scale)
    _rewrite(root / "base", root / "double", lambda _k, w: 2 * w)
    zero = ("layers.0.post_attention_layernorm", "layers.1.self_attn.q_proj", "layers.3.mlp.up_proj")
    _rewrite(
        root / "a", root / "zeroed", lambda k, w: torch.zeros_like(w) if any(z in k for z in zero) else w
    )
    return {p.name: p for p in root.iterdir()}
