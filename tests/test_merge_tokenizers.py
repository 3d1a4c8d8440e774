"""Tokenizers of merges (`tokenizer_source`, the `tokenizer:` block, `chat_template`) as mergekit 0.1.5
builds them: the same vocabulary, the same embedding and LM-head rows (max diff <= 1e-6), and tokenizer
files that load with transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import CHAT_TEMPLATE, character_tokenizer, make_tiny_chat_llama
from workers.merge.config import load_merge_config
from workers.merge.executor import merge_models
from workers.merge.homology import HomologyError

MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"
needs_mergekit = pytest.mark.skipif(
    not MERGEKIT.exists(), reason="mergekit 0.1.5 (test extra) is not installed"
)
OTHER_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
IM_TOKENS = ["<|im_start|>", "<|im_end|>"]


def make_expert(base: Path, path: Path, seed: int, added: list[str], special: bool, template: str) -> None:
    """A fine-tune-like variant of `base` whose tokenizer adds `added` tokens, with embedding and LM-head rows
    for them (config vocab_size follows)."""
    shutil.copytree(base, path)
    generator = torch.Generator().manual_seed(seed)
    weights = load_file(base / "model.safetensors")
    weights = {k: w + 0.02 * torch.randn(w.shape, generator=generator) for k, w in weights.items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = 0.02 * torch.randn((len(added), weights[name].shape[1]), generator=generator)
        weights[name] = torch.cat([weights[name], extra])
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = 128 + len(added)
    (path / "config.json").write_text(json.dumps(config))
    tokenizer = character_tokenizer()
    tokenizer.add_tokens(added, special_tokens=special)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """base: the 128-token character tokenizer; a: plus two special chat tokens (130 rows) and another chat
    template; b: the base's tokenizer, fine-tuned weights."""
    root = tmp_path_factory.mktemp("tokfamily")
    make_tiny_chat_llama(root / "base", seed=0)
    make_expert(root / "base", root / "a", seed=1, added=IM_TOKENS, special=True, template=OTHER_TEMPLATE)
    make_expert(root / "base", root / "b", seed=2, added=[], special=False, template=CHAT_TEMPLATE)
    return root


RECIPE = """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.3}}
dtype: float32
"""


SAME_VOCABULARY = """
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.4}}
  - model: {b}
    parameters: {{weight: 0.6}}
dtype: float32
"""


def run_both(text: str, tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "merge.yml").write_text(text)
    subprocess.run(
        [str(MERGEKIT), str(tmp_path / "merge.yml"), str(tmp_path / "mk"), "--allow-crimes"],
        check=True,
        capture_output=True,
    )
    config = load_merge_config(text)
    (tmp_path / "strata").mkdir()
    merge_models(
        config,
        {ref: Path(ref) for ref in config.input_models},
        tmp_path / "strata",
        device=torch.device("cpu"),
    )
    return tmp_path / "strata", tmp_path / "mk"


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in directory.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def assert_same_model(ours: Path, theirs: Path) -> None:
    a, b = tensors(ours), tensors(theirs)
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a), {
        k: (a[k].shape, b[k].shape) for k in a if a[k].shape != b[k].shape
    }
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"max |strata - mergekit| = {worst}"
    ours_tok, theirs_tok = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    assert ours_tok.get_vocab() == theirs_tok.get_vocab()
    assert ours_tok.chat_template == theirs_tok.chat_template
    assert {i: t.content for i, t in ours_tok.added_tokens_decoder.items()} == {
        i: t.content for i, t in theirs_tok.added_tokens_decoder.items()
    }
    text = "<|im_start|>user hi<|im_end|>"
    assert ours_tok(text)["input_ids"] == theirs_tok(text)["input_ids"]
    size = json.loads((ours / "config.json").read_text())["vocab_size"]
    assert (
        size
        == json.loads((theirs / "config.json").read_text())["vocab_size"]
        == a["model.embed_tokens.weight"].shape[0]
    )
    model = AutoModelForCausalLM.from_pretrained(ours).eval()
    ids = ours_tok(text, return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3


def fill(text: str, root: Path) -> str:
    return text.format(base=root / "base", a=root / "a", b=root / "b")


@needs_mergekit
@pytest.mark.parametrize(
    ("extra", "rows"),
    [
        ("tokenizer_source: union\n", 130),
        ("tokenizer_source: base\n", 128),
        ("tokenizer_source: {a}\n", 130),
        ("tokenizer_source: union\nchat_template: auto\n", 130),
        (
            "tokenizer:\n"
            "  source: union\n"
            "  pad_to_multiple_of: 8\n"
            "  tokens:\n"
            "    <|im_start|>: {{source: {{kind: model_token, model: {base}, token: <s>}}, force: true}}\n"
            "    a: {{source: {a}, force: true}}\n"
            "    <tool>: {{source: {{kind: zero}}}}\n"
            "    <think>: {{source: {{kind: model_token, model: {a}, token_id: 5}}}}\n",
            136,
        ),
    ],
)
def test_tokenizer_sources_match_mergekit(family, tmp_path, extra, rows):
    ours, theirs = run_both(fill(RECIPE + extra, family), tmp_path)
    assert_same_model(ours, theirs)
    assert tensors(ours)["model.embed_tokens.weight"].shape[0] == rows


SLICES = """
merge_method: task_arithmetic
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 2]}}
      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 0.6}}}}
      - {{model: {b}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}
  - sources:
      - {{model: {base}, layer_range: [1, 4]}}
      - {{model: {a}, layer_range: [1, 4], parameters: {{weight: 0.2}}}}
      - {{model: {b}, layer_range: [1, 4], parameters: {{weight: 0.7}}}}
dtype: float32
tokenizer_source: union
"""


@needs_mergekit
def test_slices_form_moves_each_slices_vocabulary_rows_as_mergekit(family, tmp_path):
    """Embedding rows of the first slice's sources and LM-head rows of the last slice's sources move
    onto the union vocabulary; the output has the slices' 5 layers."""
    ours, theirs = run_both(fill(SLICES, family), tmp_path)
    assert_same_model(ours, theirs)
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == 5
    assert tensors(ours)["lm_head.weight"].shape[0] == 130


@needs_mergekit
def test_chat_template_given_as_text_is_saved_without_a_tokenizer_source(family, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\\n{% endfor %}"
    ours, theirs = run_both(fill(SAME_VOCABULARY, family) + f'chat_template: "{template}"\n', tmp_path)
    assert_same_model(ours, theirs)
    assert AutoTokenizer.from_pretrained(ours).chat_template == template.replace("\\n", "\n")


@needs_mergekit
def test_chatml_by_name_renders_as_mergekits(family, tmp_path):
    ours, theirs = run_both(fill(SAME_VOCABULARY, family) + "chat_template: chatml\n", tmp_path)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    for prompt in (False, True):
        rendered = [
            AutoTokenizer.from_pretrained(d).apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=prompt
            )
            for d in (ours, theirs)
        ]
        assert rendered[0] == rendered[1] and rendered[0].startswith(
            "<|im_start|>system\nBe brief.<|im_end|>\n"
        )


def test_union_rows_come_from_the_model_that_has_the_token(family, tmp_path):
    """<|im_start|> exists in a only: every model's row for it is a's, so the merged row is
    base + 0.6 (a - a) + 0.3 (a - a) = a's row; shared tokens merge as usual."""
    config = load_merge_config(fill(RECIPE, family) + "tokenizer_source: union\n")
    merge_models(
        config, {ref: Path(ref) for ref in config.input_models}, tmp_path, device=torch.device("cpu")
    )
    merged = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    a = load_file(family / "a" / "model.safetensors")["model.embed_tokens.weight"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    row = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert torch.equal(merged[row], a[a.shape[0] - 2])
    assert not torch.equal(merged[5], a[5])


def test_without_tokenizer_settings_the_base_tokenizer_is_copied_as_it_is(family, tmp_path):
    text = RECIPE.replace("{a}", "{b}").replace("weight: 0.6", "weight: 0.5")
    config = load_merge_config(
        fill(text, family).replace(
            "  - model: " + str(family / "b") + "\n    parameters: {weight: 0.5}\n", "", 1
        )  # b once: a model may appear once per slice
    )
    merge_models(
        config, {ref: Path(ref) for ref in config.input_models}, tmp_path, device=torch.device("cpu")
    )
    assert (tmp_path / "tokenizer.json").read_bytes() == (family / "base" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("tokenizer_source: nowhere\n", "not one of the input models"),
        ("tokenizer_source: union\ntokenizer: {source: base}\n", "not both"),
        ("chat_template: vicuna\n", "chat_template"),
        (
            "tokenizer:\n  tokens: {x: {source: {kind: model_token, model: elsewhere, token_id: 1}}}\n",
            "not an input model",
        ),
        ("tokenizer:\n  tokens: {x: {force: true}}\n", "no source"),
        ("tokenizer:\n  pad_to_multiple_of: 0\n", "pad_to_multiple_of"),
        (
            "tokenizer:\n  tokens: {x: {source: {kind: model_token, model: m, token_id: 1, token: y}}}\n",
            "exactly one",
        ),
    ],
)
def test_bad_tokenizer_settings_are_rejected(family, extra, message):
    with pytest.raises(Exception, match=message):  # noqa: B017  (MergeConfigError wraps the ValidationError)
        load_merge_config(fill(RECIPE, family) + extra)


def test_models_whose_vocabularies_differ_need_a_tokenizer_source(family, tmp_path):
    config = load_merge_config(fill(RECIPE, family))
    with pytest.raises(HomologyError, match="lm_head.*set tokenizer_source"):
        merge_models(
            config, {ref: Path(ref) for ref in config.input_models}, tmp_path, device=torch.device("cpu")
        )
