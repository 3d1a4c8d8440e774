"""The same YAML gives the same tensors as mergekit 0.1.5 on deterministic methods (max diff <= 1e-6)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import make_tiny_llama, make_variant
from workers.merge.config import load_merge_config
from workers.merge.executor import merge_models

MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"
pytestmark = pytest.mark.skipif(not MERGEKIT.exists(), reason="mergekit 0.1.5 (test extra) is not installed")

RECIPES = {
    "linear": """
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: [0.1, 0.9]}}
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters:
      weight:
        - filter: self_attn
          value: [0.2, 0.6, 1.0]
        - value: 0.4
parameters:
  lambda: 0.9
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: 0.6, density: [0.3, 0.8]}}
  - model: {b}
    parameters: {{weight: -0.4, density: 0.5}}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
""",
    "ties_unnormalized": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.9}}
parameters:
  normalize: false
  lambda: 1.3
dtype: float32
""",
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    make_tiny_llama(root / "base", seed=0)
    make_variant(root / "base", root / "a", seed=1, scale=0.01)
    make_variant(root / "base", root / "b", seed=2, scale=0.02)
    return root


def max_diff_to_mergekit(text: str, base: Path, tmp_path: Path, strata_extra: str = "") -> float:
    """Run the YAML through mergekit-yaml and Strata (with `strata_extra` appended); max |difference|.
    Also checks the merge changed something relative to `base`."""
    (tmp_path / "merge.yml").write_text(text)
    subprocess.run(
        [
            str(MERGEKIT),
            str(tmp_path / "merge.yml"),
            str(tmp_path / "mk"),
            "--no-lazy-unpickle",
            "--allow-crimes",
        ],
        check=True,
        capture_output=True,
    )
    config = load_merge_config(text + strata_extra)
    paths = {ref: Path(ref) for ref in config.input_models}
    (tmp_path / "strata").mkdir()
    merge_models(config, paths, tmp_path / "strata", device=torch.device("cpu"))
    theirs = {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        theirs.update(load_file(f))
    ours = load_file(tmp_path / "strata" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    source = load_file(base / "model.safetensors")
    assert any(not torch.equal(ours[k], source[k]) for k in ours)  # the merge did something
    shutil.rmtree(tmp_path / "mk")
    shutil.rmtree(tmp_path / "strata")
    return max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_strata_matches_mergekit(family, tmp_path, recipe):
    text = RECIPES[recipe].format(base=family / "base", a=family / "a", b=family / "b")
    worst = max_diff_to_mergekit(text, family / "base", tmp_path)
    assert worst <= 1e-6, f"max |strata - mergekit| = {worst}"


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    """Base and variants on a 1/256 grid, so |delta| takes a handful of exact values: the TIES trim
    threshold is shared by many entries and the tie-break decides which of them survive."""
    root = tmp_path_factory.mktemp("tied")
    make_tiny_llama(root / "base", seed=0)
    weights = load_file(root / "base" / "model.safetensors")
    grid = {name: torch.round(w * 256) / 256 for name, w in weights.items()}
    save_file(grid, root / "base" / "model.safetensors", metadata={"format": "pt"})
    for name, seed in (("a", 1), ("b", 2)):
        shutil.copytree(root / "base", root / name)
        generator = torch.Generator().manual_seed(seed)
        moved = {k: w + torch.randint(-2, 3, w.shape, generator=generator) / 256 for k, w in grid.items()}
        save_file(moved, root / name / "model.safetensors", metadata={"format": "pt"})
    return root


def test_ties_keeps_the_tied_entries_mergekit_keeps(tied_family, tmp_path):
    text = RECIPES["ties"].format(base=tied_family / "base", a=tied_family / "a", b=tied_family / "b")
    base = tied_family / "base"
    assert max_diff_to_mergekit(text, base, tmp_path) == 0.0  # default tie_break: mergekit
    assert max_diff_to_mergekit(text, base, tmp_path, "tie_break: first\n") > 1e-3  # other tied entries
