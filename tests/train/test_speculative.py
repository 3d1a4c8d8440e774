"""Self-speculative decoding gives exactly the full-depth greedy output, with a rolled-back cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.early_exit.adapters import Affine, ExitAdapters
from workers.generation.compact import CompactLlama
from workers.generation.engine import EarlyExitEngine, FinishEvent, GenerationRequest, TokenEvent
from workers.generation.reference import greedy_reference
from workers.generation.speculative import _Decoder, speculative_events, speculative_generate

NEW = 12


@pytest.fixture(scope="module")
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def near_exit_model(tiny_dir):
    """Layers 3 and 4 scaled down: exit 2 often (not always) agrees with full depth; drafts get accepted."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.self_attn.o_proj.weight.mul_(0.3)
            layer.mlp.down_proj.weight.mul_(0.3)
    return model


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(4, 128, (n,), generator=generator).tolist() for n in (1, 6, 11)]


@pytest.fixture(scope="module")
def references(model, near_exit_model, prompts):
    """Full-depth greedy tokens of the cache-free reference, per (model name, prompt index)."""
    nets = {"random": model, "near_exit": near_exit_model}
    return {
        (name, i): greedy_reference(net, prompt, 4, NEW)
        for name, net in nets.items()
        for i, prompt in enumerate(prompts)
    }


@pytest.mark.parametrize("k, m", [(1, 2), (2, 1), (2, 4), (3, 6)])
@pytest.mark.parametrize("name", ["random", "near_exit"])
def test_greedy_equals_full_depth_reference(request, references, chat_tokenizer, prompts, name, k, m):
    net = request.getfixturevalue("model" if name == "random" else "near_exit_model")
    for i, prompt in enumerate(prompts):
        result = speculative_generate(net, chat_tokenizer, prompt, k, m, max_new_tokens=NEW, ignore_eos=True)
        assert result.token_ids == references[name, i]
        assert result.finish_reason == "length"
        assert 0 <= result.accepted <= result.drafted
        assert result.acceptance_rate == (result.accepted / result.drafted if result.drafted else 0.0)


def test_equals_transformers_generate_and_accepts_drafts(near_exit_model, chat_tokenizer, prompts):
    accepted = 0
    for prompt in prompts:
        result = speculative_generate(near_exit_model, chat_tokenizer, prompt, 2, 4, 20, ignore_eos=True)
        theirs = near_exit_model.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert result.token_ids == theirs[0, len(prompt) :].tolist()
        assert result.text == chat_tokenizer.decode(result.token_ids, skip_special_tokens=True)
        assert result.iterations < len(result.token_ids)  # some iterations committed several tokens
        accepted += result.accepted
    assert accepted > 0


def test_identity_upper_layers_accept_every_draft(tiny_dir, chat_tokenizer, prompts):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    result = speculative_generate(model, chat_tokenizer, prompts[1], 2, 4, 15, ignore_eos=True)
    assert result.acceptance_rate == 1.0 and result.iterations == 3  # 5 tokens per iteration
    assert result.token_ids == greedy_reference(model, prompts[1], 4, 15)


def test_cache_after_generation_equals_a_plain_prefill(near_exit_model, chat_tokenizer, prompts):
    prompt = prompts[2]
    request = GenerationRequest(prompt_ids=prompt, depth=4, max_new_tokens=13, ignore_eos=True)
    decoder = _Decoder(CompactLlama(near_exit_model), chat_tokenizer, request, 2, 3, [])
    tokens = [e.token_id for e in decoder.events() if isinstance(e, TokenEvent)]
    with torch.no_grad():
        plain = near_exit_model(torch.tensor([prompt + tokens[:-1]]), use_cache=True).past_key_values
    n = len(prompt) + len(tokens) - 1  # the last token was never fed back
    assert decoder.cache.depth == 4
    for layer, theirs in enumerate(plain.layers):
        torch.testing.assert_close(decoder.cache.keys[layer, :1, :, :n], theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            decoder.cache.values[layer, :1, :, :n], theirs.values, rtol=1e-5, atol=1e-5
        )


def test_drafts_come_from_the_adapted_exit_and_output_stays_full_depth_greedy(
    near_exit_model, chat_tokenizer, prompts
):
    hidden = near_exit_model.config.hidden_size
    generator = torch.Generator().manual_seed(5)
    scrambled = Affine(torch.randn(hidden, hidden, generator=generator), torch.zeros(hidden))
    adapters = ExitAdapters({2: scrambled}, 4, hidden)
    plain = EarlyExitEngine(near_exit_model, chat_tokenizer, device="cpu")
    adapted = EarlyExitEngine(near_exit_model, chat_tokenizer, device="cpu", adapters=adapters)
    ours = speculative_generate(adapted, chat_tokenizer, prompts[1], 2, 4, NEW, ignore_eos=True)
    theirs = speculative_generate(plain, chat_tokenizer, prompts[1], 2, 4, NEW, ignore_eos=True)
    assert ours.token_ids == theirs.token_ids == greedy_reference(near_exit_model, prompts[1], 4, NEW)
    assert ours.acceptance_rate < theirs.acceptance_rate  # a scrambling adapter drafts badly
    request = GenerationRequest(prompt_ids=prompts[1], depth=4, max_new_tokens=NEW, ignore_eos=True)
    finish = list(speculative_events(adapted, request, 2, 4))[-1]
    assert finish.exit_adapter is True and finish.precision == "float32"
    off = request.model_copy(update={"exit_adapter": False})
    assert list(speculative_events(adapted, off, 2, 4))[-1].speculative["acceptance_rate"] == pytest.approx(
        theirs.acceptance_rate
    )


def test_eos_stop_and_engine_events(near_exit_model, chat_tokenizer, prompts):
    engine = EarlyExitEngine(near_exit_model, chat_tokenizer, device="cpu")
    full = speculative_generate(engine, chat_tokenizer, prompts[1], 2, 4, NEW, ignore_eos=True)
    eos = full.token_ids[6]
    stopped = speculative_generate(engine, chat_tokenizer, prompts[1], 2, 4, NEW, eos=[eos])
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(eos)]
    stop = full.text[len(full.text) // 2 :][:2]
    cut = speculative_generate(engine, chat_tokenizer, prompts[1], 2, 4, NEW, stop=[stop], ignore_eos=True)
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    request = GenerationRequest(prompt_ids=prompts[1], depth=4, max_new_tokens=NEW, ignore_eos=True)
    events = list(speculative_events(engine, request, 2, 4))
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == full.token_ids
    finish = events[-1]
    assert isinstance(finish, FinishEvent) and finish.token_ids == full.token_ids
    assert "".join(e.delta for e in events) == full.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(draft_depth=4, num_draft_tokens=2), "draft_depth"),
        (dict(draft_depth=0, num_draft_tokens=2), "draft_depth"),
        (dict(draft_depth=2, num_draft_tokens=0), "num_draft_tokens"),
        (dict(draft_depth=2, num_draft_tokens=2, max_new_tokens=300), "exceeds"),
    ],
)
def test_invalid_arguments(model, chat_tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        speculative_generate(model, chat_tokenizer, [5, 6], **kwargs)
