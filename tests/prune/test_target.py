import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from tests.prune.helpers import logits
from tests.tiny_models import make_tiny_llama
from workers.prune.prune import prune
from workers.prune.target import PruneTarget, costs, plan


@pytest.mark.parametrize("which", ["tiny", "tiny_qwen2"])
@pytest.mark.parametrize(
    "target",
    [
        PruneTarget(num_hidden_layers=2),
        PruneTarget(intermediate_size=40, num_key_value_heads=1),
        PruneTarget(num_hidden_layers=3, intermediate_size=96),
        PruneTarget(param_budget=120_000),
        PruneTarget(param_budget=150_000, axes=("mlp",)),
    ],
)
def test_pruned_config_equals_the_plan_exactly(which, target, request, calibration):
    source = request.getfixturevalue(which)
    the_plan = plan(source, target)
    for mode in ("activation", "random"):
        result = prune(source, target, calibration, mode=mode, seed=0)
        config = result.model.config
        assert config.num_hidden_layers == the_plan.num_hidden_layers
        assert config.intermediate_size == the_plan.intermediate_size
        assert config.num_key_value_heads == the_plan.num_key_value_heads
        assert config.num_attention_heads == the_plan.num_attention_heads
        assert result.model.num_parameters() == the_plan.params
        for name in ("num_hidden_layers", "intermediate_size", "num_key_value_heads"):
            if getattr(target, name) is not None:
                assert getattr(config, name) == getattr(target, name)
        if target.param_budget is not None:
            assert the_plan.params <= target.param_budget
    assert source.config.num_hidden_layers == 4 and source.config.intermediate_size == 128


def test_param_count_formula_matches_real_models(tmp_path):
    for tied in (False, True):
        model = make_tiny_llama(tmp_path / str(tied), tie_word_embeddings=tied, attention_bias=True)
        c = costs(model)
        assert c.params(4, 128, 2) == model.num_parameters()
        smaller = make_tiny_llama(
            tmp_path / f"s{tied}",
            tie_word_embeddings=tied,
            attention_bias=True,
            num_hidden_layers=3,
            intermediate_size=72,
            num_key_value_heads=1,
            num_attention_heads=2,
            head_dim=16,
        )
        assert c.params(3, 72, 1) == smaller.num_parameters()


def test_budget_planning_respects_axes_and_spreads_the_cut(tiny):
    n = tiny.num_parameters()
    depth_only = plan(tiny, PruneTarget(param_budget=int(0.8 * n), axes=("depth",)))
    assert (depth_only.num_hidden_layers, depth_only.intermediate_size, depth_only.num_key_value_heads) == (
        3,
        128,
        2,
    )
    mlp_only = plan(tiny, PruneTarget(param_budget=int(0.8 * n), axes=("mlp",)))
    assert mlp_only.num_hidden_layers == 4 and mlp_only.intermediate_size % 8 == 0
    assert mlp_only.params <= 0.8 * n < mlp_only.params + 4 * 8 * costs(tiny).mlp_channel
    spread = plan(tiny, PruneTarget(param_budget=int(0.7 * n), axes=("depth", "mlp")))
    assert (spread.num_hidden_layers, spread.intermediate_size) == (3, 104)  # both cut, neither past 25%
    width = plan(tiny, PruneTarget(param_budget=int(0.7 * n)))
    assert width.num_hidden_layers == 4 and width.params <= 0.7 * n
    fixed = plan(tiny, PruneTarget(param_budget=int(0.7 * n), num_hidden_layers=4))
    assert fixed.num_hidden_layers == 4 and fixed.params <= 0.7 * n
    with pytest.raises(ValueError):
        plan(tiny, PruneTarget(param_budget=1000))
    with pytest.raises(ValueError):
        plan(tiny, PruneTarget(intermediate_size=256))
    with pytest.raises(ValidationError):
        PruneTarget()


def test_pruning_is_deterministic_and_saves_for_plain_transformers(tiny, calibration, tmp_path):
    target = PruneTarget(num_hidden_layers=3, intermediate_size=64, num_key_value_heads=1)
    seen = []
    a = prune(tiny, target, calibration, progress=lambda done, total, message: seen.append((done, total)))
    b = prune(tiny, target, calibration)
    r1, r2 = (prune(tiny, target, calibration, mode="random", seed=s) for s in (1, 1))
    assert a.removed_layers == b.removed_layers and len(a.influence) == 4
    torch.testing.assert_close(logits(a.model, calibration), logits(b.model, calibration), rtol=0, atol=0)
    torch.testing.assert_close(logits(r1.model, calibration), logits(r2.model, calibration), rtol=0, atol=0)
    assert seen and seen[-1][0] == seen[-1][1] and all(d <= t for d, t in seen)
    a.model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.num_parameters() == a.plan.params
    torch.testing.assert_close(logits(loaded, calibration), logits(a.model, calibration), rtol=0, atol=0)
