"""Every method added for mergekit parity, and the slices form, give mergekit 0.1.5's tensors (max diff
<= 1e-6 in float32) on the same YAML, for tiny models with tied and with untied embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.mergekit_parity import (
    load_dir,
    make_parity_family,
    max_diff,
    mergekit_available,
    num_layers,
    run_mergekit,
)
from tests.tiny_models import make_tiny_qwen2
from workers.merge.config import load_merge_config
from workers.merge.executor import merge_models

pytestmark = pytest.mark.skipif(
    not mergekit_available(), reason="mergekit 0.1.5 (test extra) is not installed"
)

RECIPES = {
    "slerp_t_gradients_and_filters": """
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    "slerp_colinear_falls_back_to_lerp": """
merge_method: slerp
base_model: {base}
models:
  - model: {double}
parameters: {{t: 0.3}}
""",
    "slerp_zero_norms": """
merge_method: slerp
base_model: {zeroed}
models:
  - model: {b}
parameters: {{t: [0.2, 0.8]}}
""",
    "nuslerp_flattened_with_base": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: [0.2, 0.9]}}
""",
    "nuslerp_row_wise": """
merge_method: nuslerp
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {zeroed}
    parameters: {{weight: 3.0}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
""",
    "nuslerp_rows_with_colinear_inputs": """
merge_method: nuslerp
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {double}
    parameters: {{weight: 0.25}}
parameters: {{nuslerp_flatten: false}}
""",
    "multislerp_with_base": """
merge_method: multislerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: [0.6, 0.1]}}
  - model: {c}
    parameters: {{weight: 0.2}}
""",
    "multislerp_without_base_unnormalized": """
merge_method: multislerp
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {zeroed}
    parameters: {{weight: 0.5}}
parameters: {{normalize_weights: false}}
""",
    "karcher_with_base_appended": """
merge_method: karcher
base_model: {base}
models:
  - model: {a}
  - model: {zeroed}
  - model: {c}
parameters: {{max_iter: 25, tol: 1.0e-7}}
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
""",
    "model_stock_filter_wise": """
merge_method: model_stock
base_model: {base}
models:
  - model: {base}
  - model: {a}
  - model: {zeroed}
parameters: {{filter_wise: true}}
""",
    "nearswap": """
merge_method: nearswap
base_model: {base}
models:
  - model: {b}
parameters:
  t: [0.001, 0.04]
""",
    "arcee_fusion": """
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {base}
  - model: {a}
""",
    "passthrough_scaled": """
merge_method: passthrough
models:
  - model: {a}
    parameters:
      scale:
        - filter: o_proj
          value: 0.5
        - filter: down_proj
          value: [0.0, 1.0]
        - value: 1.0
""",
    "passthrough_depth_up_scaling": """
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {a}
        layer_range: [1, 4]
""",
    "passthrough_frankenmerge": """
merge_method: passthrough
slices:
  - sources:
      - model: {b}
        layer_range: [0, 2]
  - sources:
      - model: {c}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
  - sources:
      - model: {a}
        layer_range: [3, 4]
""",
    "linear_slices_source_over_slice_over_global": """
merge_method: linear
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
        parameters: {{weight: 0.8}}
      - model: {b}
        layer_range: [2, 4]
    parameters: {{weight: [0.1, 0.5]}}
  - sources:
      - model: {c}
        layer_range: [1, 4]
      - model: {a}
        layer_range: [0, 3]
        parameters:
          weight:
            - filter: mlp
              value: 2.0
parameters:
  weight: 0.4
  normalize: true
""",
    "ties_slices_with_their_own_base_and_density": """
merge_method: ties
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {a}
        layer_range: [0, 4]
        parameters: {{weight: 0.6, density: [0.3, 0.9]}}
      - model: {b}
        layer_range: [0, 4]
    parameters: {{weight: 0.5, density: 0.5}}
  - base_model: {c}
    sources:
      - model: {c}
        layer_range: [2, 4]
      - model: {b}
        layer_range: [2, 4]
        parameters: {{weight: 1.0}}
    parameters: {{density: 0.7}}
""",
    "slerp_slices_with_a_slice_base": """
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {a}
        layer_range: [2, 4]
    parameters: {{t: [0.1, 0.9]}}
  - base_model: {b}
    sources:
      - model: {base}
        layer_range: [1, 4]
      - model: {b}
        layer_range: [1, 4]
parameters: {{t: 0.3}}
""",
}


@pytest.fixture(scope="module", params=["untied", "tied"])
def family(request, tmp_path_factory) -> dict[str, Path]:
    return make_parity_family(tmp_path_factory.mktemp(request.param), tied=request.param == "tied")


def strata_and_mergekit(text: str, tmp_path: Path) -> tuple[Path, Path]:
    run_mergekit(text, tmp_path / "mk")
    config = load_merge_config(text)
    (tmp_path / "strata").mkdir()
    merge_models(
        config,
        {ref: Path(ref) for ref in config.input_models},
        tmp_path / "strata",
        device=torch.device("cpu"),
    )
    return tmp_path / "strata", tmp_path / "mk"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_method_and_slices_match_mergekit(family, tmp_path, recipe):
    text = RECIPES[recipe].format(**family) + "dtype: float32\n"
    ours_dir, theirs_dir = strata_and_mergekit(text, tmp_path)
    ours, theirs = load_dir(ours_dir), load_dir(theirs_dir)
    worst = max_diff(ours, theirs)
    assert worst <= 1e-6, f"max |strata - mergekit| = {worst}"
    assert num_layers(ours_dir) == num_layers(theirs_dir)
    sources = [load_dir(family[name]) for name in ("base", "a", "b")]
    assert all(any(not torch.equal(ours[k], s[k]) for k in ours if k in s) for s in sources)  # it merged


def test_depth_up_scaling_renumbers_layers_and_generates(family, tmp_path):
    text = RECIPES["passthrough_depth_up_scaling"].format(**family)
    config = load_merge_config(text)
    out = tmp_path / "dus"
    out.mkdir()
    merge_models(config, {ref: Path(ref) for ref in config.input_models}, out, device=torch.device("cpu"))
    ours, source = load_dir(out), load_dir(family["a"])
    assert num_layers(out) == 6
    for out_layer, src_layer in enumerate([0, 1, 2, 1, 2, 3]):
        name = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(ours[name.format(out_layer)], source[name.format(src_layer)])
    assert torch.equal(ours["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    assert ("lm_head.weight" in ours) == ("lm_head.weight" in source)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    generated = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    shutil.rmtree(out)


def test_non_layer_tensors_come_from_the_first_and_last_slices(family, tmp_path):
    text = RECIPES["passthrough_frankenmerge"].format(**family)
    config = load_merge_config(text)
    (tmp_path / "out").mkdir()
    merge_models(
        config, {r: Path(r) for r in config.input_models}, tmp_path / "out", device=torch.device("cpu")
    )
    ours, first, last = load_dir(tmp_path / "out"), load_dir(family["b"]), load_dir(family["a"])
    assert torch.equal(ours["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert torch.equal(ours["model.norm.weight"], last["model.norm.weight"])
    if "lm_head.weight" in ours:
        assert torch.equal(ours["lm_head.weight"], last["lm_head.weight"])


def test_depth_up_scaling_a_qwen2_rebuilds_its_per_layer_config(tmp_path):
    make_tiny_qwen2(seed=0, num_hidden_layers=4).save_pretrained(tmp_path / "qwen")
    text = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {tmp_path / "qwen"}, layer_range: [0, 3]}}]
  - sources: [{{model: {tmp_path / "qwen"}, layer_range: [1, 4]}}]
"""
    config = load_merge_config(text)
    (tmp_path / "out").mkdir()
    merge_models(
        config, {r: Path(r) for r in config.input_models}, tmp_path / "out", device=torch.device("cpu")
    )
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 6 and len(written["layer_types"]) == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)
