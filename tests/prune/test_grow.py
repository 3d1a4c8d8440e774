import torch
from transformers import AutoModelForCausalLM

from tests.prune.helpers import logits
from workers.eval.compare import max_logit_diff
from workers.grow.depth import grow_depth
from workers.grow.width import channel_map, grow_mlp_width
from workers.prune.layers import decoder_layers


def test_depth_growth_is_exact_and_loads_in_plain_transformers(tiny, calibration, tmp_path):
    grown = grow_depth(tiny, [0, 2, 2])
    layers = decoder_layers(grown)
    assert grown.config.num_hidden_layers == 7 and len(layers) == 7
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(7))
    src = decoder_layers(tiny)
    assert torch.equal(layers[1].self_attn.q_proj.weight, src[0].self_attn.q_proj.weight)
    assert not layers[1].mlp.down_proj.weight.any() and not layers[4].self_attn.o_proj.weight.any()
    assert torch.equal(logits(grown, calibration), logits(tiny, calibration))
    assert max_logit_diff(tiny, grown, calibration) == 0.0
    grown.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 7
    assert torch.equal(logits(loaded, calibration), logits(tiny, calibration))


def test_depth_growth_keeps_layer_types(tiny_qwen2, calibration):
    grown = grow_depth(tiny_qwen2, [3])
    assert grown.config.layer_types == ["full_attention"] * 5
    assert torch.equal(logits(grown, calibration), logits(tiny_qwen2, calibration))


def test_width_growth_preserves_the_function(tiny, calibration, tmp_path):
    grown = grow_mlp_width(tiny, 200, seed=3)
    assert grown.config.intermediate_size == 200
    mlp = decoder_layers(grown)[0].mlp
    assert mlp.gate_proj.weight.shape == (200, 64) and mlp.down_proj.weight.shape == (64, 200)
    assert max_logit_diff(tiny, grown, calibration) <= 1e-4
    grown.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_logit_diff(tiny, loaded, calibration) <= 1e-4


def test_channel_map_duplicates_seeded_and_splits_down_columns(tiny):
    g = channel_map(128, 300, seed=1)
    assert torch.equal(g, channel_map(128, 300, seed=1)) and torch.equal(g[:128], torch.arange(128))
    grown = grow_mlp_width(tiny, 300, seed=0)
    down, src = decoder_layers(grown)[0].mlp.down_proj.weight, decoder_layers(tiny)[0].mlp.down_proj.weight
    g = channel_map(128, 300, seed=0)
    copies = torch.bincount(g, minlength=128)
    torch.testing.assert_close(down[:, :128] * copies, src)


def test_channel_map_draws_without_replacement_so_copies_stay_balanced():
    up_to_double = torch.bincount(channel_map(128, 256, seed=3), minlength=128)
    assert up_to_double.max() == 2 and up_to_double.min() == 2
    partial = torch.bincount(channel_map(128, 200, seed=3), minlength=128)
    assert set(partial.tolist()) == {1, 2} and int((partial == 2).sum()) == 72
    beyond = torch.bincount(channel_map(128, 300, seed=3), minlength=128)
    assert int(beyond.max() - beyond.min()) <= 1 and int(beyond.sum()) == 300
