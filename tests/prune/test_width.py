import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.prune.helpers import logits
from workers.prune.layers import decoder_layers
from workers.prune.width import activation_scores, prune_width, random_scores, top_indices


def test_width_pruning_shapes_keep_gqa_valid(tiny, calibration, tmp_path):
    pruned = prune_width(
        tiny, activation_scores(tiny, calibration), intermediate_size=48, num_key_value_heads=1
    )
    config = pruned.config
    assert (config.intermediate_size, config.num_key_value_heads, config.num_attention_heads) == (48, 1, 2)
    assert config.head_dim == 16
    for layer in decoder_layers(pruned):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (32, 64) and attn.o_proj.weight.shape == (64, 32)
        assert attn.k_proj.weight.shape == (16, 64) and attn.v_proj.weight.shape == (16, 64)
        assert mlp.gate_proj.weight.shape == (48, 64) and mlp.down_proj.weight.shape == (64, 48)
    assert tiny.config.intermediate_size == 128 and tiny.config.num_key_value_heads == 2
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, calibration), logits(pruned, calibration), rtol=0, atol=0)


def test_query_heads_follow_their_kv_group(tiny, calibration):
    scores = activation_scores(tiny, calibration)
    scores.kv = [torch.tensor([0.0, 1.0]) for _ in scores.kv]  # keep KV head 1 -> query heads 2, 3
    pruned = prune_width(tiny, scores, intermediate_size=128, num_key_value_heads=1)
    src, dst = decoder_layers(tiny)[0].self_attn, decoder_layers(pruned)[0].self_attn
    assert torch.equal(dst.q_proj.weight, src.q_proj.weight[32:])
    assert torch.equal(dst.k_proj.weight, src.k_proj.weight[16:])
    assert torch.equal(dst.o_proj.weight, src.o_proj.weight[:, 32:])


def silence(model, channels, kv_group):
    """A copy whose MLP `channels` never activate (gate rows 0, so silu(0) * up = 0) though their down_proj
    columns are made 10x larger than any other, and whose KV group `kv_group` writes nothing (o_proj 0)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer in decoder_layers(out):
            mlp, attn = layer.mlp, layer.self_attn
            mlp.gate_proj.weight[channels] = 0
            mlp.down_proj.weight[:, channels] *= (
                10 * mlp.down_proj.weight.abs().max() / mlp.down_proj.weight[:, channels].abs().max()
            )
            attn.o_proj.weight[:, kv_group * 32 : (kv_group + 1) * 32] = 0
    return out


def test_activation_ranking_beats_weight_magnitude_and_random(tiny, calibration):
    dead = list(range(0, 128, 2))  # half the channels are large in weight but never fire
    model = silence(tiny, dead, kv_group=0)
    scores = activation_scores(model, calibration)
    assert all(torch.equal(top_indices(s, 64), torch.arange(1, 128, 2)) for s in scores.mlp)
    assert all(s[0] == 0 and s[1] > 0 for s in scores.kv)
    reference = logits(model, calibration)
    kept = prune_width(model, scores, intermediate_size=64, num_key_value_heads=1)
    torch.testing.assert_close(logits(kept, calibration), reference, rtol=0, atol=1e-5)
    weight_norm = [layer.mlp.down_proj.weight.norm(dim=0) for layer in decoder_layers(model)]
    assert all(set(top_indices(w, 64).tolist()) == set(dead) for w in weight_norm)  # magnitude would fail
    shuffled = prune_width(model, random_scores(model, seed=0), intermediate_size=64, num_key_value_heads=1)
    assert (logits(shuffled, calibration) - reference).abs().max() > 0.1


def test_random_scores_are_seeded(tiny):
    a, b, c = random_scores(tiny, 1), random_scores(tiny, 1), random_scores(tiny, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.mlp + a.kv, b.mlp + b.kv, strict=True))
    assert not torch.equal(a.mlp[0], c.mlp[0])
    with pytest.raises(ValueError):
        top_indices(torch.ones(4), 5)
