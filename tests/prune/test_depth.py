import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.prune.helpers import logits
from workers.grow.depth import zero_output
from workers.prune.depth import drop_layers, least_influential, random_layers
from workers.prune.influence import block_influence
from workers.prune.layers import decoder_layers


def with_identity_layer(model, index):
    """A copy of the model whose layer `index` adds nothing to the residual stream."""
    import copy

    out = copy.deepcopy(model)
    zero_output(decoder_layers(out)[index])
    return out


def test_influence_matches_the_residual_stream_and_reads_the_last_layer_before_the_norm(tiny, calibration):
    scores = block_influence(tiny, calibration)
    ids = torch.cat(calibration)
    with torch.no_grad():
        states = tiny(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(3):  # hidden_states[i] enters layer i and hidden_states[i + 1] leaves it, for i < 3
        expected = 1 - F.cosine_similarity(states[i], states[i + 1], dim=-1).mean().item()
        assert scores[i] == pytest.approx(expected, abs=1e-5)
    # The last layer made an identity: its influence is 0 from hooks, though the normed output differs.
    identity = with_identity_layer(tiny, 3)
    assert block_influence(identity, calibration)[3] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        normed = identity(input_ids=ids, output_hidden_states=True).hidden_states
    assert 1 - F.cosine_similarity(normed[3], normed[4], dim=-1).mean().item() > 1e-3


def test_least_influential_and_random_selection():
    assert least_influential([0.5, 0.1, 0.3, 0.1], 2) == [1, 3]
    assert random_layers(30, 6, seed=3) == random_layers(30, 6, seed=3)
    assert random_layers(30, 6, seed=3) != random_layers(30, 6, seed=4)
    with pytest.raises(ValueError):
        least_influential([0.1, 0.2], 2)


def test_dropping_an_identity_layer_keeps_the_logits(tiny, calibration):
    identity = with_identity_layer(tiny, 1)
    assert least_influential(block_influence(identity, calibration), 1) == [1]
    pruned = drop_layers(identity, [1])
    assert pruned.config.num_hidden_layers == 3 and len(decoder_layers(pruned)) == 3
    assert [layer.self_attn.layer_idx for layer in decoder_layers(pruned)] == [0, 1, 2]
    torch.testing.assert_close(logits(pruned, calibration), logits(identity, calibration), rtol=0, atol=1e-5)
    assert identity.config.num_hidden_layers == 4 and len(decoder_layers(identity)) == 4


def test_pruned_model_decodes_with_a_kv_cache(tiny):
    pruned = drop_layers(tiny, [0, 2])
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = pruned(ids).logits[:, -1]
        prefix = pruned(ids[:, :-1], use_cache=True)
        step = pruned(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["tiny", "tiny_qwen2"])
def test_depth_pruned_model_round_trips_through_plain_transformers(which, request, calibration, tmp_path):
    source = request.getfixturevalue(which)
    pruned = drop_layers(source, [2])
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 3
    if getattr(source.config, "layer_types", None) is not None:
        assert loaded.config.layer_types == [source.config.layer_types[i] for i in (0, 1, 3)]
    torch.testing.assert_close(logits(loaded, calibration), logits(pruned, calibration), rtol=0, atol=0)
