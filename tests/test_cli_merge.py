"""Local `strata merge`: partial output is cleaned up on interrupt and at the next start, and bad input
gets one line on stderr, never a traceback, and a mergekit-moe YAML builds the MoE model (real
subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.tiny_models import make_slow_llama, make_tiny_chat_llama, make_tiny_llama, make_variant
from workers.moe.build import build_moe
from workers.moe.config import MoeConfig


def strata(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def run(*args: str, timeout: float = 300) -> tuple[int, str]:
    proc = strata(*args)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def recipe(tmp_path, a, b, weight: str = "0.5", name: str = "recipe.yml"):
    path = tmp_path / name
    path.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: {weight}}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.5}}\n"
    )
    return path


@pytest.fixture
def pair(tmp_path):
    make_tiny_llama(tmp_path / "a", seed=0)
    make_variant(tmp_path / "a", tmp_path / "b", seed=1)
    return tmp_path / "a", tmp_path / "b"


def test_a_partial_output_left_by_a_killed_run_is_removed_at_the_next_start(tmp_path, pair):
    leftover = tmp_path / ".out.partial"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    code, err = run("merge", str(recipe(tmp_path, *pair)), str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").exists() and not leftover.exists()
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_local_merge_removes_its_partial_output(tmp_path, sig):
    make_slow_llama(tmp_path / "a")
    make_variant(tmp_path / "a", tmp_path / "b", seed=1)
    partial = tmp_path / ".out.partial"
    proc = strata("merge", str(recipe(tmp_path, tmp_path / "a", tmp_path / "b")), str(tmp_path / "out"))
    deadline = time.monotonic() + 240
    while not (partial.exists() and any(partial.iterdir())) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not partial.exists() and not (tmp_path / "out").exists()


def _lying(tmp_path, a) -> str:
    liar = tmp_path / "liar"
    make_tiny_llama(liar)
    raw = b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}'
    (liar / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    return recipe(tmp_path, a, liar, name="liar.yml")


BOMB = "\n".join(
    ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    + ["merge_method: linear", "models: [{model: x, parameters: {weight: *a8}}]"]
)


@pytest.mark.parametrize("case", ["invalid yaml", "yaml bomb", "nan weight", "missing model", "lying header"])
def test_bad_input_to_local_merge_gets_one_line_and_no_traceback(tmp_path, pair, case):
    a, b = pair
    if case == "invalid yaml":
        (tmp_path / "r.yml").write_text("merge_method: [unclosed\n")
        config = tmp_path / "r.yml"
    elif case == "yaml bomb":
        (tmp_path / "r.yml").write_text(BOMB)
        config = tmp_path / "r.yml"
    elif case == "nan weight":
        config = recipe(tmp_path, a, b, weight=".nan")
    elif case == "missing model":
        config = recipe(tmp_path, a, tmp_path / "nowhere")
    else:
        config = _lying(tmp_path, a)
    start = time.monotonic()
    code, err = run("merge", str(config), str(tmp_path / "out"), timeout=120)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_submit_without_a_server_or_with_invalid_yaml_prints_one_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [unclosed\n")
    for args in (
        ("submit", str(bad), "--server", "http://127.0.0.1:9"),
        ("models", "--server", "http://127.0.0.1:9"),
    ):
        code, err = run(*args, timeout=120)
        assert code == 1, err
        assert "Traceback" not in err and "cannot reach a Strata server" in err
        assert len(err.strip().splitlines()) == 1, err


MOE = """base_model: {base}
gate_mode: cheap_embed
experts_per_token: 1
dtype: float32
experts:
  - source_model: {a}
    positive_prompts: ["the cat sat on the mat"]
  - source_model: {b}
    positive_prompts: ["numbers 123 456"]
    negative_prompts: ["the cat"]
"""


@pytest.fixture
def moe_experts(tmp_path):
    make_tiny_chat_llama(tmp_path / "base", seed=0)
    for name, seed in (("a", 1), ("b", 2)):
        make_variant(tmp_path / "base", tmp_path / name, seed=seed, scale=0.05)
    return {name: tmp_path / name for name in ("base", "a", "b")}


def _weights(directory) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_local_merge_of_a_mergekit_moe_yaml_writes_the_moe_model(tmp_path, moe_experts):
    text = MOE.format(**moe_experts)
    (tmp_path / "moe.yml").write_text(text)
    code, err = run("merge", str(tmp_path / "moe.yml"), str(tmp_path / "out"))
    assert code == 0, err
    assert "mixtral with 2 experts" in err and " s on cpu" in err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 2 and config["num_experts_per_tok"] == 1
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert not (tmp_path / ".out.partial").exists()
    recipe_ = MoeConfig.model_validate(yaml.safe_load(text))
    (tmp_path / "direct").mkdir()
    build_moe(
        recipe_, {r: Path(r) for r in recipe_.input_models}, tmp_path / "direct", device=torch.device("cpu")
    )
    ours, direct = _weights(tmp_path / "out"), _weights(tmp_path / "direct")
    assert ours.keys() == direct.keys() and all(torch.equal(ours[k], direct[k]) for k in ours)
    routers = [k for k in ours if k.endswith("mlp.gate.weight")]
    assert routers and all(ours[k].shape[0] == 2 for k in routers)
    experts = [k for k in ours if "experts" in k and "down_proj" in k]
    assert experts, sorted(ours)[:10]
    a, b = _weights(moe_experts["a"]), _weights(moe_experts["b"])
    down = experts[0]
    layer = down.split(".layers.")[1].split(".")[0]
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    assert torch.equal(ours[down][0], a[name]) and torch.equal(ours[down][1], b[name])


@pytest.mark.parametrize("case", ["missing expert", "bad field"])
def test_bad_moe_yaml_to_local_merge_gets_one_line(tmp_path, moe_experts, case):
    text = MOE.format(
        **{**moe_experts, "b": tmp_path / "nowhere"} if case == "missing expert" else moe_experts
    )
    if case == "bad field":
        text = text.replace("experts_per_token: 1", "experts_per_token: 5")
    (tmp_path / "moe.yml").write_text(text)
    code, err = run("merge", str(tmp_path / "moe.yml"), str(tmp_path / "out"), timeout=120)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert ("nowhere" if case == "missing expert" else "experts_per_token") in err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_local_merge_of_a_slices_recipe_stacks_the_layers(tmp_path, pair):
    a, _ = pair
    (tmp_path / "dus.yml").write_text(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 3]\n"
        f"  - sources:\n      - model: {a}\n        layer_range: [1, 4]\n"
    )
    code, err = run("merge", str(tmp_path / "dus.yml"), str(tmp_path / "out"))
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    ours, source = _weights(tmp_path / "out"), _weights(a)
    name = "model.layers.{}.self_attn.q_proj.weight"
    for out_layer, in_layer in enumerate([0, 1, 2, 1, 2, 3]):
        assert torch.equal(ours[name.format(out_layer)], source[name.format(in_layer)])
