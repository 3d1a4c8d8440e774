"""MoE from dense experts: the same YAML gives the same tensors as mergekit-moe 0.1.5 (max diff <= 1e-5),
and the result loads in transformers and generates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import (
    CHAT_TEMPLATE,
    character_tokenizer,
    make_tiny_chat_llama,
    make_tiny_qwen2,
    make_variant,
)
from workers.merge.homology import HomologyError
from workers.moe.build import build_moe, check_moe_inputs
from workers.moe.config import MoeConfig, is_moe_recipe
from workers.moe.layouts import LayoutError

MERGEKIT_MOE = Path(sys.executable).parent / "mergekit-moe"
needs_mergekit = pytest.mark.skipif(
    not MERGEKIT_MOE.exists(), reason="mergekit 0.1.5 (test extra) is not installed"
)

EXPERTS = """
base_model: {base}
gate_mode: {mode}
dtype: {dtype}
experts_per_token: 2
experts:
  - source_model: {a}
    positive_prompts: ["the cat sat on the mat", "hello there, friend"]
    negative_prompts: ["numbers 123"]
  - source_model: {b}
    positive_prompts: ["numbers 123 456", "count: 7, 8, 9"]
  - source_model: {c}
    positive_prompts: ["Why? Because!"]
    residual_scale: 0.5
"""

SHARED = """
base_model: {base}
gate_mode: {mode}
dtype: {dtype}
experts_per_token: 1
experts:
  - source_model: {a}
    positive_prompts: ["the cat sat on the mat"]
  - source_model: {b}
    positive_prompts: ["numbers 123 456"]
    negative_prompts: ["the cat"]
shared_experts:
  - source_model: {base}
    positive_prompts: ["anything at all"]
"""  # mergekit-moe 0.1.5 reads a shared expert only when it is also the base or an expert


def save_chat_variant(base: Path, path: Path, seed: int) -> None:
    make_variant(base, path, seed=seed, scale=0.05)
    tokenizer = character_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("experts")
    make_tiny_chat_llama(root / "base", seed=0)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        save_chat_variant(root / "base", root / name, seed)
    return root


def recipe(template: str, root: Path, mode: str, dtype: str = "float32") -> str:
    return template.format(
        base=root / "base", a=root / "a", b=root / "b", c=root / "c", mode=mode, dtype=dtype
    )


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in directory.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def build(text: str, out: Path) -> MoeConfig:
    config = MoeConfig.model_validate(yaml.safe_load(text))
    out.mkdir()
    build_moe(config, {ref: Path(ref) for ref in config.input_models}, out, device=torch.device("cpu"))
    return config


def mergekit_moe(text: str, tmp_path: Path) -> Path:
    (tmp_path / "moe.yml").write_text(text)
    subprocess.run(
        [str(MERGEKIT_MOE), str(tmp_path / "moe.yml"), str(tmp_path / "mk")], check=True, capture_output=True
    )
    return tmp_path / "mk"


@needs_mergekit
@pytest.mark.parametrize(
    ("template", "mode", "dtype", "architecture"),
    [
        (EXPERTS, "hidden", "float32", "MixtralForCausalLM"),
        (EXPERTS, "hidden_avg", "bfloat16", "MixtralForCausalLM"),
        (EXPERTS, "cheap_embed", "float32", "MixtralForCausalLM"),
        (SHARED, "hidden", "float32", "Qwen2MoeForCausalLM"),
    ],
)
def test_moe_matches_mergekit_moe(experts, tmp_path, template, mode, dtype, architecture):
    text = recipe(template, experts, mode, dtype)
    build(text, tmp_path / "strata")
    theirs_dir = mergekit_moe(text, tmp_path)
    ours, theirs = tensors(tmp_path / "strata"), tensors(theirs_dir)
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape for k in ours)
    worst = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)
    assert worst <= 1e-5, f"max |strata - mergekit-moe| = {worst}"
    routers = [k for k in ours if k.endswith("mlp.gate.weight")]
    assert len(routers) == 4 and all(ours[k].abs().sum() > 0 for k in routers)
    assert not torch.equal(ours[routers[0]][0], ours[routers[0]][1])  # the prompts set different rows
    ours_cfg = json.loads((tmp_path / "strata" / "config.json").read_text())
    theirs_cfg = json.loads((theirs_dir / "config.json").read_text())
    assert ours_cfg == theirs_cfg and ours_cfg["architectures"] == [architecture]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "strata").eval()
    assert type(model).__name__ == architecture
    assert model.generate(torch.tensor([[1, 30, 31]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_moe_loads_in_transformers_and_generates_with_each_expert_mlp(experts, tmp_path):
    build(recipe(EXPERTS, experts, "hidden"), tmp_path / "moe")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 3
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moe")
    assert tokenizer.chat_template == CHAT_TEMPLATE  # the base's tokenizer files travel along
    ids = tokenizer("the cat", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 6
    # Expert 2 of layer 1 is expert c's MLP with down_proj x residual_scale; attention is the base's.
    c = tensors(experts / "c")
    base = tensors(experts / "base")
    mlp = model.model.layers[1].mlp.experts
    inter = c["model.layers.1.mlp.gate_proj.weight"].shape[0]
    assert torch.equal(mlp.gate_up_proj[2][:inter], c["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(mlp.gate_up_proj[2][inter:], c["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(mlp.down_proj[2], c["model.layers.1.mlp.down_proj.weight"] * 0.5)
    q = model.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q, base["model.layers.1.self_attn.q_proj.weight"])


def test_random_gates_are_seeded_and_reproducible(experts, tmp_path):
    text = recipe(EXPERTS, experts, "random") + "seed: 7\n"
    build(text, tmp_path / "one")
    build(text, tmp_path / "two")
    build(text.replace("seed: 7", "seed: 8"), tmp_path / "three")
    one, two, three = (tensors(tmp_path / d) for d in ("one", "two", "three"))
    router = "model.layers.0.mlp.gate.weight"
    assert torch.equal(one[router], two[router]) and not torch.equal(one[router], three[router])
    rows = torch.stack([one[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)])
    assert rows.shape == (4, 3, 64) and 0.8 < rows.std().item() < 1.2  # N(0, 1), as mergekit draws them


def test_mergekit_moe_yaml_is_recognised_by_its_keys(experts):
    assert is_moe_recipe(yaml.safe_load(recipe(EXPERTS, experts, "hidden")))
    assert not is_moe_recipe({"merge_method": "linear", "models": [{"model": "x"}]})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gate_mode": "telepathy"}, "gate_mode"),
        ({"experts_per_token": 4}, "only 3 experts"),
        ({"experts_per_token": 0}, "experts_per_token"),
        ({"experts": [{"source_model": "x", "positive_prompts": ["p"]}] * 2}, "prompts are all the same"),
        (
            {"experts": [{"source_model": "x", "positive_prompts": ["p"]}, {"source_model": "y"}]},
            "no positive_prompts",
        ),
        (
            {
                "experts": [
                    {"source_model": "x", "positive_prompts": ["p"]},
                    {"source_model": "x", "positive_prompts": ["q"]},
                ]
            },
            "same model",
        ),
        (
            {"experts": [{"source_model": "x", "positive_prompts": ["p"], "noise_scale": float("nan")}] * 2},
            "noise_scale",
        ),
        ({"unknown_key": 1}, "unknown_key"),
    ],
)
def test_bad_moe_recipes_are_rejected_before_any_file_is_read(experts, change, message):
    data = {**yaml.safe_load(recipe(EXPERTS, experts, "hidden")), **change}
    with pytest.raises(ValidationError, match=message):
        MoeConfig.model_validate(data)


def test_experts_that_are_not_homologous_are_refused(experts, tmp_path):
    make_tiny_chat_llama(tmp_path / "wide", seed=4, intermediate_size=96)
    config = MoeConfig.model_validate(
        yaml.safe_load(recipe(EXPERTS, experts, "hidden").replace(str(experts / "c"), str(tmp_path / "wide")))
    )
    with pytest.raises(HomologyError, match="mlp"):
        check_moe_inputs(config, {ref: Path(ref) for ref in config.input_models})


def test_a_shared_expert_without_prompts_has_no_architecture_here(experts):
    data = yaml.safe_load(recipe(SHARED, experts, "hidden"))
    data["shared_experts"][0].pop("positive_prompts")
    config = MoeConfig.model_validate(data)
    with pytest.raises(LayoutError, match="DeepSeek"):
        check_moe_inputs(config, {ref: Path(ref) for ref in config.input_models})
    data["architecture"] = "mixtral"
    config = MoeConfig.model_validate(data)
    with pytest.raises(LayoutError, match="Mixtral has no shared experts"):
        check_moe_inputs(config, {ref: Path(ref) for ref in config.input_models})


def test_failed_build_leaves_no_complete_model(experts, tmp_path):
    text = recipe(EXPERTS, experts, "hidden")
    shutil.copytree(experts / "c", tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(
        (experts / "c" / "model.safetensors").read_bytes()[:4096]
    )
    config = MoeConfig.model_validate(
        yaml.safe_load(text.replace(str(experts / "c"), str(tmp_path / "broken")))
    )
    (tmp_path / "out").mkdir()
    with pytest.raises(Exception):  # noqa: B017  (a truncated safetensors file fails wherever it is read)
        build_moe(
            config,
            {ref: Path(ref) for ref in config.input_models},
            tmp_path / "out",
            device=torch.device("cpu"),
        )
    assert not (tmp_path / "out" / "config.json").exists()


def test_qwen_moe_takes_the_shared_expert_from_any_model(experts, tmp_path):
    """mergekit-moe 0.1.5 can read a shared expert only when it is also the base or an expert; Strata reads
    it from its own model."""
    text = recipe(SHARED, experts, "cheap_embed").replace(
        f"shared_experts:\n  - source_model: {experts / 'base'}",
        f"shared_experts:\n  - source_model: {experts / 'c'}",
    )
    config = build(text, tmp_path / "qwen")
    assert config.shared_experts[0].source_model == str(experts / "c")
    ours, c = tensors(tmp_path / "qwen"), tensors(experts / "c")
    for projection in ("gate_proj", "up_proj", "down_proj"):
        name = f"model.layers.3.mlp.{projection}.weight"
        assert torch.equal(ours[f"model.layers.3.mlp.shared_expert.{projection}.weight"], c[name])
    assert ours["model.layers.3.mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert not ours["model.layers.0.self_attn.q_proj.bias"].any()  # a LLaMA base has no q/k/v biases
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen").eval()
    assert model.generate(torch.tensor([[1, 30]]), max_new_tokens=2, do_sample=False).shape == (1, 4)


def test_uniform_random_gates_and_noise_are_seeded(experts, tmp_path):
    text = recipe(EXPERTS, experts, "uniform_random").replace(
        "    residual_scale: 0.5", "    noise_scale: 0.01"
    )
    build(text, tmp_path / "one")
    build(text, tmp_path / "two")
    one, two, c = tensors(tmp_path / "one"), tensors(tmp_path / "two"), tensors(experts / "c")
    assert all(torch.equal(one[k], two[k]) for k in one)
    rows = one["model.layers.1.mlp.gate.weight"]
    assert rows.abs().max() <= 1 / 64**0.5 and rows.std() > 0.05  # U(-1/sqrt(H), 1/sqrt(H))
    noise = one["model.layers.1.mlp.experts.down_proj"][2] - c["model.layers.1.mlp.down_proj.weight"]
    assert 0.008 < noise.std().item() < 0.012


@pytest.fixture(scope="module")
def qwen_experts(tmp_path_factory) -> Path:
    """Tiny Qwen2 models (q/k/v biases) with the character tokenizer: a base and two perturbed copies."""
    root = tmp_path_factory.mktemp("qwen-experts")
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        model = make_tiny_qwen2(seed=0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * seed * torch.randn(param.shape, generator=generator))
        model.save_pretrained(root / name)
        character_tokenizer().save_pretrained(root / name)
    return root


@needs_mergekit
def test_qwen2_experts_make_a_qwen2_moe_like_mergekits(qwen_experts, tmp_path):
    text = recipe(SHARED, qwen_experts, "hidden")
    build(text, tmp_path / "strata")
    ours, theirs = tensors(tmp_path / "strata"), tensors(mergekit_moe(text, tmp_path))
    assert ours.keys() == theirs.keys() and "model.layers.0.self_attn.q_proj.bias" in ours
    worst = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)
    assert worst <= 1e-5, f"max |strata - mergekit-moe| = {worst}"
    base = tensors(qwen_experts / "base")
    assert torch.equal(
        ours["model.layers.0.self_attn.q_proj.bias"], base["model.layers.0.self_attn.q_proj.bias"]
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "strata").eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
