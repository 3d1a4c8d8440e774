"""The same YAML gives the same tensors as mergekit 0.1.5 on deterministic methods (max diff <= 1e-6)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_strata_matches_mergekit(family, tmp_path, recipe):
    text = RECIPES[recipe].format(base=family / "base", a=family / "a", b=family / "b")
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
    config = load_merge_config(text)
    paths = {ref: Path(ref) for ref in config.input_models}
    (tmp_path / "strata").mkdir()
    merge_models(config, paths, tmp_path / "strata", device=torch.device("cpu"))

    theirs = {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        theirs.update(load_file(f))
    ours = load_file(tmp_path / "strata" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    worst = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)
    assert worst <= 1e-6, f"max |strata - mergekit| = {worst}"
    base = load_file(family / "base" / "model.safetensors")
    assert any(not torch.equal(ours[k], base[k]) for k in ours)  # the merge did something
    shutil.rmtree(tmp_path / "mk")
