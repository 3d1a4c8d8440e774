"""Learned structured masks to a target shape (LLM-Shearing): gates, the Lagrangian, exact extraction."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tests.tiny_models import tiny_llama_config
from workers.generation.compact import CompactLlama
from workers.prune.prune import prune, target_shape
from workers.prune.shear import (
    Gates,
    MaskOptions,
    Shape,
    check_shape,
    extract,
    first_components,
    keep_probability,
    lagrangian,
    learn_masks,
    masked_logits,
    sample_gates,
    shape_of_model,
)
from workers.prune.target import PruneTarget
from workers.train.data import Batch

TARGET = Shape(
    num_hidden_layers=3, hidden_size=48, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96
)


def eight_head_llama(tied: bool, eps: float = 1e-6) -> LlamaForCausalLM:
    """4 layers, hidden 64, 8 query heads in 2 KV groups (4 per group), MLP 128."""
    torch.manual_seed(3)
    config = tiny_llama_config(
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=tied, rms_norm_eps=eps
    )
    return LlamaForCausalLM(config).eval()


def random_stream(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(3, 128, (2, 24), generator=generator)
        yield Batch(ids, ids, torch.ones_like(ids))


def test_gate_keep_probability_matches_sampled_frequency():
    logits = torch.tensor([-2.0, 0.0, 1.5])
    draws = torch.stack([sample_gates(logits, 2 / 3, torch.Generator().manual_seed(i)) for i in range(4000)])
    assert (draws > 0).float().mean(0) == pytest.approx(keep_probability(logits, 2 / 3), abs=0.03)
    assert draws.min() >= 0 and draws.max() <= 1 and (draws == 1).any() and (draws == 0).any()


def test_lagrangian_is_the_papers_form_and_pushes_multipliers_against_the_gap():
    s_hat = torch.tensor([0.1, 0.3])
    l1, l2 = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    value = lagrangian(s_hat, 0.5, l1, l2)
    gap = s_hat - 0.5
    assert value.item() == pytest.approx((2 * gap + 3 * gap**2).mean().item())
    value.backward()
    assert l1.grad.item() == pytest.approx(gap.mean().item()) and l2.grad.item() > 0


@pytest.mark.parametrize("tied", [False, True])
def test_extracted_model_computes_what_the_gated_source_computes(tied):
    """Every family cut, the hidden dimension too: embeddings, norms and the (tied or not) head stay
    consistent, so the cut model equals the source with the cut components gated to exactly 0 (up to the
    norms' epsilon, which a random init's tiny activations make visible: set to 1e-12 here)."""
    model = eight_head_llama(tied, eps=1e-12)
    gates = Gates(Shape.of(model.config), TARGET, 2 / 3)
    with torch.no_grad():
        for logits in gates.logits.values():
            logits.normal_(generator=torch.Generator().manual_seed(1))
    small = extract(model, gates.keep())
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = small(input_ids=ids, use_cache=False).logits
    want = masked_logits(model, gates, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    assert Shape.of(small.config) == TARGET and small.config.head_dim == 8
    if tied:
        assert small.lm_head.weight is small.model.embed_tokens.weight


def test_masks_reach_the_target_shape_and_the_model_loads_in_plain_transformers(tmp_path):
    model = eight_head_llama(tied=False)
    source = copy.deepcopy(model)
    options = MaskOptions(steps=12, seq_len=24, batch_size=2)
    gates, report = learn_masks(model, TARGET, random_stream(), options, device="cpu")
    assert report.target == {"layer": 3, "kv": 1, "head": 2, "intermediate": 96, "hidden": 48}
    assert len(report.losses) == 12 and set(report.expected) == set(report.target)
    small = extract(model, gates.keep())
    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert Shape.of(loaded.config) == TARGET
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, small(input_ids=ids).logits, atol=1e-5)
    # the model's weights were trained jointly (model_lr > 0); a frozen run leaves them alone
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), source.parameters(), strict=True))
    frozen = copy.deepcopy(source)
    learn_masks(frozen, TARGET, random_stream(), MaskOptions(steps=2, model_lr=0), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(frozen.parameters(), source.parameters(), strict=True))


def test_the_lagrangian_drives_expected_sizes_to_the_target():
    """Model frozen, long enough: each family's expected kept count ends within 5 % of its target."""
    model = eight_head_llama(tied=False)
    options = MaskOptions(steps=150, model_lr=0, mask_lr=0.5, multiplier_lr=0.05, batch_size=1)
    _, report = learn_masks(model, TARGET, random_stream(1), options, device="cpu")
    sizes = {"layer": 4, "kv": 2, "head": 4, "intermediate": 128, "hidden": 64}
    for family, want in report.target.items():
        assert abs(report.expected[family] - want) <= 0.05 * sizes[family] + 0.1, (family, report.expected)


def test_prune_in_learned_mode_gives_the_exact_target_config(tiny, calibration):
    target = PruneTarget(num_hidden_layers=3, hidden_size=48, num_key_value_heads=1)
    result = prune(tiny, target, calibration, "learned", mask_options=MaskOptions(steps=3))
    config = result.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (3, 48, 1)
    assert config.num_attention_heads == 2 and result.plan.hidden_size == 48
    assert len(result.removed_layers) == 1 and result.plan.params == result.model.num_parameters()
    assert result.masks is not None and result.masks.steps == 3
    with pytest.raises(ValueError, match="only mode learned"):
        prune(tiny, target, calibration, "activation")


def test_first_components_baseline_keeps_the_first_of_everything():
    model = eight_head_llama(tied=False)
    kept = first_components(Shape.of(model.config), TARGET)
    assert kept["layer"].tolist() == [0, 1, 2] and kept["hidden"].tolist() == list(range(48))
    assert Shape.of(extract(model, kept).config) == TARGET


def test_shapes_that_cannot_be_cut_are_refused(tiny):
    source = Shape.of(tiny.config)  # 4 layers, hidden 64, 4 heads in 2 groups, MLP 128
    for bad, message in (
        (Shape(4, 80, 4, 2, 128), "hidden_size=80 must lie"),
        (Shape(4, 64, 3, 2, 128), "not divisible"),
        (Shape(4, 62, 4, 2, 128), "not a multiple of num_attention_heads=4"),
        (Shape(4, 64, 4, 1, 128), "query heads per KV group"),
    ):
        with pytest.raises(ValueError, match=message):
            check_shape(source, bad)
    assert target_shape(tiny, PruneTarget(hidden_size=32)) == Shape(4, 32, 4, 2, 128)
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(ValueError, match="family"):
        shape_of_model(config, {**config, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="head_dim"):
        shape_of_model(
            config, {**config, "hidden_size": 48, "num_attention_heads": 4, "num_hidden_layers": 2}
        )


def test_the_serving_engine_runs_a_sheared_model_as_transformers_does():
    """Hidden size no longer heads x head_dim, 2 query heads per KV group: CompactLlama reads head_dim."""
    model = eight_head_llama(tied=True)
    gates = Gates(Shape.of(model.config), TARGET, 2 / 3)
    with torch.no_grad():
        for logits in gates.logits.values():
            logits.normal_(generator=torch.Generator().manual_seed(4))
    small = extract(model, gates.keep()).eval()
    engine = CompactLlama(small)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    got = engine.forward(ids, torch.arange(12)[None], engine.new_cache(3, 1, 32), 3, last_only=False)
    with torch.no_grad():
        want = small(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_the_mask_phase_cuts_rows_to_its_sequence_length():
    model = eight_head_llama(tied=False)
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[1]))
    learn_masks(model, TARGET, random_stream(), MaskOptions(steps=2, seq_len=10), device="cpu")
    handle.remove()
    assert seen == [10, 10]
