import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.prune.helpers import logits
from workers.eval.texts import answer_windows
from workers.grow.depth import zero_output
from workers.prune.depth import drop_layers
from workers.prune.heal import distillation_gap, kd_kl
from workers.prune.influence import block_influence
from workers.prune.layers import decoder_layers
from workers.prune.prune import prune
from workers.prune.replace import (
    Block,
    FitOptions,
    block_distances,
    block_influences,
    choose_block,
    collect_pairs,
    cut_block,
    fit_replacement,
    masked_kd,
    predicting,
    random_block,
    relative_mse,
    replace_block,
)
from workers.prune.target import PruneTarget


def with_identity_layers(model, indices):
    out = copy.deepcopy(model)
    for i in indices:
        zero_output(decoder_layers(out)[i])
    return out


def test_block_influence_is_one_minus_the_cosine_across_the_block(tiny, calibration):
    block_bi, layer_bi = block_influences(tiny, calibration, 2)
    assert len(block_bi) == 3 and len(layer_bi) == 4
    ids = torch.cat(calibration)
    with torch.no_grad():
        states = tiny(input_ids=ids, output_hidden_states=True).hidden_states  # [4] is after the final norm
    for i in range(2):
        expected = 1 - F.cosine_similarity(states[i], states[i + 2], dim=-1).mean().item()
        assert block_bi[i] == pytest.approx(expected, abs=1e-5)
    # Single-layer influence agrees with the hook-based ShortGPT score, the last layer included.
    assert layer_bi == pytest.approx(block_influence(tiny, calibration), abs=1e-5)
    assert block_influences(tiny, calibration, 1)[0] == pytest.approx(layer_bi, abs=1e-9)


def test_the_block_that_does_nothing_is_chosen_and_started_from_its_most_influential_layer(tiny, calibration):
    identity = with_identity_layers(tiny, [1, 2])
    block_bi, layer_bi = block_influences(identity, calibration, 2)
    assert block_bi[1] == pytest.approx(0.0, abs=1e-6)
    assert choose_block(block_bi, layer_bi, 2).start == 1
    assert choose_block([0.3, 0.1, 0.1], [0.5, 0.2, 0.4, 0.1], 2) == Block(start=1, size=2, init=2)
    assert choose_block([0.3, 0.2], [0.5, 0.5, 0.5], 2) == Block(start=1, size=2, init=1)


def test_random_block_is_reproducible_and_inside_the_stack():
    blocks = [random_block(10, 4, seed) for seed in range(20)]
    assert all(0 <= b.start <= 6 and b.init in b.layers for b in blocks)
    assert random_block(10, 4, 3) == random_block(10, 4, 3)
    assert len({b.start for b in blocks}) > 1


def test_a_replacement_fitted_on_a_one_layer_block_recovers_that_layer(tiny):
    # Replace layer 2 by a copy of layer 1 and fit it to layer 2's input -> output map.
    generator = torch.Generator().manual_seed(1)
    text = [torch.randint(3, 128, (1, 64), generator=generator) for _ in range(72)]
    fitting, fresh = text[:64], text[64:]
    block = Block(start=2, size=1, init=2)
    pruned = cut_block(tiny, block)
    decoder_layers(pruned)[2].load_state_dict(decoder_layers(tiny)[1].state_dict())
    pairs, unseen = collect_pairs(tiny, fitting, block), collect_pairs(tiny, fresh, block)
    unseen_before = relative_mse(decoder_layers(pruned)[2], pruned, unseen)
    logit_gap_before = (logits(pruned, fresh) - logits(tiny, fresh)).abs().mean().item()
    report = fit_replacement(pruned, 2, pairs, FitOptions(steps=600, lr=3e-3), device="cpu")
    assert report.mse_before > 0.05
    assert report.mse_after < 0.03 * report.mse_before
    assert relative_mse(decoder_layers(pruned)[2], pruned, pairs) == pytest.approx(report.mse_after)
    # The fitted layer computes what layer 2 computed, on text it was not fitted to.
    # (relative MSE from about 0.5 to under 0.03 there; the logits move about 10x closer to the source's)
    assert relative_mse(decoder_layers(pruned)[2], pruned, unseen) < min(0.03, 0.06 * unseen_before)
    logit_gap = (logits(pruned, fresh) - logits(tiny, fresh)).abs().mean().item()
    assert logit_gap < 0.2 * logit_gap_before
    # Only the replacement moved; the layers around it are the source's.
    for i in (0, 1, 3):
        for p, q in zip(
            decoder_layers(pruned)[i].parameters(), decoder_layers(tiny)[i].parameters(), strict=True
        ):
            assert torch.equal(p, q)
    assert all(p.requires_grad for p in pruned.parameters())


def test_the_final_kl_term_pulls_the_output_distribution_toward_the_source(tiny, calibration):
    block = Block(start=1, size=2, init=1)
    pairs = collect_pairs(tiny, calibration, block, with_logits=True)
    with pytest.raises(ValueError, match="logits"):
        fit_replacement(
            cut_block(tiny, block), 1, collect_pairs(tiny, calibration, block), FitOptions(kl_weight=1)
        )
    pruned = cut_block(tiny, block)
    before = distillation_gap(pruned, tiny, calibration)
    options = FitOptions(steps=60, lr=1e-3, kl_weight=1.0)
    report = fit_replacement(pruned, 1, pairs, options, device="cpu")
    assert distillation_gap(pruned, tiny, calibration) < 0.7 * before
    assert report.mse_after < report.mse_before


@pytest.mark.parametrize("which", ["tiny", "tiny_qwen2"])
def test_replaced_model_is_a_plain_model_of_n_minus_1_fewer_layers(which, request, calibration, tmp_path):
    source = request.getfixturevalue(which)
    seen = []
    progress = lambda done, total, message: seen.append((done / total, message))  # noqa: E731
    done = replace_block(source, calibration, 3, options=FitOptions(steps=5), progress=progress, device="cpu")
    phases = [m.split(":")[0] for _, m in seen]
    assert phases[0] == "replace 1/4" and phases[-1] == "replace 4/4"
    assert {"replace 2/4", "replace 3/4"} <= set(phases)
    assert [f for f, _ in seen] == sorted(f for f, _ in seen) and seen[-1][0] == 1.0
    model = done.model
    assert model.config.num_hidden_layers == 2 and len(decoder_layers(model)) == 2
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1]
    assert source.config.num_hidden_layers == 4 and len(decoder_layers(source)) == 4
    plain = drop_layers(source, done.block.layers[1:])
    assert model.num_parameters() == plain.num_parameters()
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    if getattr(source.config, "layer_types", None) is not None:
        kept = [i for i in range(4) if i not in done.block.layers]
        order = sorted([*kept, done.block.init])
        assert model.config.layer_types == [source.config.layer_types[i] for i in order]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(loaded, calibration), logits(model, calibration), rtol=0, atol=0)


def test_prune_with_replace_meets_the_plan_and_keeps_decoding_with_a_cache(tiny, calibration):
    target = PruneTarget(num_hidden_layers=2, intermediate_size=96)
    result = prune(tiny, target, calibration, replace=FitOptions(steps=3))
    plain = prune(tiny, target, calibration)
    assert result.model.num_parameters() == plain.model.num_parameters() == result.plan.params
    assert result.replaced is not None and result.removed_layers == result.replaced.layers
    assert len(result.removed_layers) == 3 and result.fit is not None and len(result.fit.losses) == 3
    rand = prune(tiny, target, calibration, mode="random", seed=1, replace=FitOptions(steps=1))
    assert rand.replaced == random_block(4, 3, 1)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = result.model(ids).logits[:, -1]
        prefix = result.model(ids[:, :-1], use_cache=True)
        step = result.model(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "target,options,message",
    [
        (PruneTarget(num_hidden_layers=4), FitOptions(), "keeps every layer"),
        (PruneTarget(num_hidden_layers=2), FitOptions(block_start=2), "crosses the end"),
        (PruneTarget(num_hidden_layers=3), FitOptions(block_start=9), "crosses the end"),
    ],
)
def test_bad_replace_targets_are_refused(tiny, calibration, target, options, message):
    with pytest.raises(ValueError, match=message):
        prune(tiny, target, calibration, replace=options)


def test_bad_blocks_are_refused(tiny, calibration):
    with pytest.raises(ValueError, match="between 1 and 4"):
        block_influences(tiny, calibration, 5)
    with pytest.raises(ValueError, match="crosses the end"):
        cut_block(tiny, Block(start=3, size=2, init=3))
    with pytest.raises(ValueError, match="not inside the block"):
        cut_block(tiny, Block(start=1, size=2, init=0))
    with pytest.raises(ValueError, match="between 1 and 4"):
        replace_block(tiny, calibration, 5)


def test_block_distance_is_the_kl_of_the_unfitted_cut_on_the_marked_tokens(tiny, calibration):
    masks = [torch.arange(32).unsqueeze(0) % 3 == 0 for _ in calibration]  # every third token "a response"
    _, layer_bi = block_influences(tiny, calibration, 2)
    distance = block_distances(tiny, calibration, masks, 2, layer_bi)
    assert len(distance) == 3
    for i in range(3):
        cut = cut_block(tiny, choose_block([1.0 * (j != i) for j in range(3)], layer_bi, 2))
        assert len(decoder_layers(cut)) == 3
        s, t = logits(cut, calibration), logits(tiny, calibration)
        where = torch.cat([predicting(m) for m in masks])
        assert where.sum() == 4 * 10  # positions 2, 5, ..., 29 predict tokens 3, 6, ..., 30
        assert distance[i] == pytest.approx(kd_kl(s[where], t[where], 2.0).item(), rel=1e-4)
    # Unmasked, every position counts; the block of lowest D is the one replace_block cuts.
    distance = block_distances(tiny, calibration, None, 2, layer_bi)
    done = replace_block(tiny, calibration, 2, options=FitOptions(steps=1), device="cpu")
    assert done.block_distance == pytest.approx(distance, rel=1e-5) and len(set(distance)) == 3
    assert done.block.start == min(range(3), key=distance.__getitem__)
    # Scoring a shortlist scores only those starts, each as before; the rest are never chosen.
    listed = block_distances(tiny, calibration, None, 2, layer_bi, starts=[2, 0])
    assert listed[1] == float("inf") and listed[0] == pytest.approx(distance[0], rel=1e-6)
    assert listed[2] == pytest.approx(distance[2], rel=1e-6)
    one = replace_block(tiny, calibration, 2, options=FitOptions(steps=1, candidates=1), device="cpu")
    block_bi, _ = block_influences(tiny, calibration, 2)
    assert one.block.start == min(range(3), key=block_bi.__getitem__)
    # A block holding identity layers and its most influential layer costs nothing: the source's function.
    identity = with_identity_layers(tiny, [2])
    _, layer_bi = block_influences(identity, calibration, 2)
    assert block_distances(identity, calibration, None, 2, layer_bi)[1] == pytest.approx(0.0, abs=1e-6)


def test_masked_kd_counts_only_the_marked_positions():
    generator = torch.Generator().manual_seed(2)
    s, t = torch.randn(1, 6, 11, generator=generator), torch.randn(1, 6, 11, generator=generator)
    where = torch.tensor([[False, True, False, False, True, False]])
    assert masked_kd(s, t, 2.0, where).item() == pytest.approx(kd_kl(s[:, [1, 4]], t[:, [1, 4]], 2.0).item())
    assert masked_kd(s, t, 2.0) == pytest.approx(kd_kl(s, t, 2.0).item())
    assert masked_kd(s, t, 2.0, torch.zeros(1, 6, dtype=torch.bool)).item() == 0.0
    marked = torch.tensor([[0, 0, 1, 1, 0, 1]])
    assert predicting(marked).tolist() == [[False, True, True, False, True, False]]


def test_the_final_kl_on_response_tokens_moves_only_what_it_counts(tiny, calibration):
    block = Block(start=1, size=2, init=1)
    masks = [torch.arange(32).unsqueeze(0) >= 16 for _ in calibration]  # the second half "answers"
    pairs = collect_pairs(tiny, calibration, block, with_logits=True, masks=masks)
    assert all(w is not None and int(w.sum()) == 16 for w in pairs.where)
    pruned = cut_block(tiny, block)
    where = torch.cat([predicting(m) for m in masks])

    def gap(model):
        s, t = logits(model, calibration), logits(tiny, calibration)
        return kd_kl(s[where], t[where], 2.0).item()

    before = gap(pruned)
    fit_replacement(pruned, 1, pairs, FitOptions(steps=60, lr=1e-3, kl_weight=1.0), device="cpu")
    assert gap(pruned) < 0.7 * before


def test_answer_windows_mark_the_assistant_turns_and_hold_none_of_the_readme_prompts(tmp_path):
    import json
    import re
    from pathlib import Path

    from transformers import AutoTokenizer

    from tests.tiny_models import make_tiny_chat_llama
    from workers.train.data import read_jsonl

    make_tiny_chat_llama(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    cut, masks = answer_windows(tok, 64)
    assert len(cut) == len(masks) > 10 and all(c.shape == m.shape for c, m in zip(cut, masks, strict=True))
    ids, marked = torch.cat(cut, 1)[0], torch.cat(masks, 1)[0]
    answers = read_jsonl(Path("workers/data/answers.jsonl"))
    first = answers[0]["messages"]
    assert tok.decode(ids[marked][: len(first[1]["content"])]).startswith(first[1]["content"][:40])
    assert first[0]["content"] not in tok.decode(ids[marked])
    # The fitting text must not contain what the pruned model is judged on (README's prompts).
    readme = Path("README.md").read_text(encoding="utf-8")
    prompts = set(re.findall(r'"(?:content|prompt)": "([^"]+)"', readme))
    assert {"What is the capital of France?", "The capital of France is", "Once upon a time"} <= prompts
    text = json.dumps(answers)
    assert not [p for p in prompts if p in text]
