"""Through `POST /v1/merges`: each new method family, and a slices frankenmerge, give mergekit 0.1.5's
tensors; bad recipes get a clear 422 and register nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests.mergekit_parity import load_dir, make_parity_family, max_diff, mergekit_available, run_mergekit

pytestmark = pytest.mark.skipif(
    not mergekit_available(), reason="mergekit 0.1.5 (test extra) is not installed"
)

YAML = {"Content-Type": "application/yaml"}

FAMILIES = {
    "slerp": """
merge_method: slerp
base_model: {base}
models:
  - model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0.1, 0.9]
    - value: 0.4
""",
    "nuslerp": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.5}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
""",
    "multislerp": """
merge_method: multislerp
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.6}}
  - model: {c}
    parameters: {{weight: [0.1, 0.5]}}
""",
    "karcher": """
merge_method: karcher
models:
  - model: {a}
  - model: {b}
  - model: {c}
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
""",
    "nearswap": """
merge_method: nearswap
base_model: {base}
models:
  - model: {b}
parameters: {{t: 0.01}}
""",
    "arcee_fusion": """
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {a}
""",
    "passthrough": """
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
""",
}


@pytest.fixture(scope="module")
def family(server) -> dict[str, Path]:
    return make_parity_family(server.home.parent / "parity", tied=False)


def _merge(server, text: str) -> dict:
    with server.client() as c:
        r = c.post("/v1/merges", content=text, headers=YAML)
        assert r.status_code == 202, r.text
        final = server.wait_job(r.json()["id"])
        assert final["status"] == "finished", final["error"]
        return final


@pytest.mark.parametrize("method", sorted(FAMILIES))
def test_api_merge_equals_mergekit(server, family, tmp_path, method):
    text = FAMILIES[method].format(**family) + "dtype: float32\n"
    final = _merge(server, text + f"name: parity-{method}\n")
    stored = server.home / "models" / final["result"]["model"]
    run_mergekit(text, tmp_path / "mk")
    worst = max_diff(load_dir(stored), load_dir(tmp_path / "mk"))
    assert worst <= 1e-6, f"max |strata - mergekit| = {worst}"
    with server.client() as c:
        record = c.get(f"/v1/models/parity-{method}").json()["strata"]
    assert record["recipe"]["merge_method"] == method
    assert set(record["parents"]) <= {str(p) for p in family.values()}


def test_api_frankenmerge_registers_the_new_depth_and_loads(server, family):
    with server.client() as c:
        record = c.get("/v1/models/parity-passthrough").json()["strata"]
    assert record["num_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(server.home / "models" / "parity-passthrough")
    assert len(model.model.layers) == 6


def _slices(a: str, ranges: list[tuple[int, int]]) -> str:
    return "slices:\n" + "".join(
        f"  - sources:\n      - model: {a}\n        layer_range: [{lo}, {hi}]\n" for lo, hi in ranges
    )


BAD = {
    "t_above_one": (
        "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters: {{t: 1.5}}\n",
        "t must be in [0, 1], got 1.5",
    ),
    "t_gradient_below_zero": (
        "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters: {{t: [0.5, -0.1]}}\n",
        "t must be in [0, 1], got -0.1",
    ),
    "t_missing": (
        "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\n",
        "slerp needs parameter 't'",
    ),
    "t_missing_for_some_tensors": (
        "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
        "parameters:\n  t:\n    - filter: self_attn\n      value: 0.5\n",
        "no value of parameter 't' applies to tensor",
    ),
    "slerp_three_models": (
        "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
        "parameters: {{t: 0.5}}\n",
        "slerp takes exactly 2 models (base included), got 3",
    ),
    "nuslerp_three_models": (
        "merge_method: nuslerp\nmodels:\n  - {{model: {a}, parameters: {{weight: 1}}}}\n"
        "  - {{model: {b}, parameters: {{weight: 1}}}}\n  - {{model: {c}, parameters: {{weight: 1}}}}\n",
        "nuslerp takes exactly 2 models besides the base, got 3",
    ),
    "boolean_given_a_number": (
        "merge_method: nuslerp\nmodels:\n  - {{model: {a}, parameters: {{weight: 1}}}}\n"
        "  - {{model: {b}, parameters: {{weight: 1}}}}\nparameters: {{nuslerp_row_wise: 0.5}}\n",
        "parameter 'nuslerp_row_wise' must be true or false",
    ),
    "model_stock_one_model": (
        "merge_method: model_stock\nbase_model: {base}\nmodels: [{{model: {a}}}]\n",
        "model_stock takes at least 3 models (base included), got 2",
    ),
    "karcher_too_many_iterations": (
        "merge_method: karcher\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{max_iter: 5000}}\n",
        "max_iter must be in [0, 1000]",
    ),
    "layer_range_past_the_model": (
        "merge_method: passthrough\n" + _slices("{a}", [(0, 3), (2, 9)]),
        "slice 1: layer_range [2, 9) exceeds model",
    ),
    "layer_range_reversed": ("merge_method: passthrough\n" + _slices("{a}", [(3, 1)]), "0 <= start < end"),
    "slice_sources_of_different_lengths": (
        "merge_method: linear\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
        "      - {{model: {b}, layer_range: [0, 3]}}\nparameters: {{weight: 1}}\n",
        "every source of a slice needs the same number of layers",
    ),
    "slice_base_not_a_source": (
        "merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n"
        "      - {{model: {a}, layer_range: [0, 4], parameters: {{weight: 1}}}}\n",
        "base model '{base}' is not among the sources (slice 0)",
    ),
    "passthrough_of_two_models": (
        "merge_method: passthrough\nmodels: [{{model: {a}}}, {{model: {b}}}]\n",
        "passthrough takes exactly 1 model (base included), got 2",
    ),
    "models_and_slices": (
        "merge_method: passthrough\nmodels: [{{model: {a}}}]\n" + _slices("{a}", [(0, 2)]),
        "give exactly one of 'models' or 'slices'",
    ),
    "slice_of_a_missing_model": (
        "merge_method: passthrough\n" + _slices("no-such-model", [(0, 2)]),
        "not registered",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_get_422_and_register_nothing(server, family, case):
    template, message = BAD[case]
    text = template.format(**family) + f"name: bad-{case.replace('_', '-')}\n"
    with server.client() as c:
        r = c.post("/v1/merges", content=text, headers=YAML)
        assert r.status_code == 422, r.text
        assert message.format(**family) in r.text, r.text
        assert c.get(f"/v1/models/bad-{case.replace('_', '-')}").status_code == 404
    assert not (server.home / "models" / f"bad-{case.replace('_', '-')}").exists()
