"""The tokenizer files of a merged model: the reference model's as they are, or the vocabulary the recipe
built (`workers.merge.vocabulary`), with the recipe's chat template.

`chat_template: auto` picks the template most input models carry (first seen wins a tie, base first);
`chatml` names ChatML (`workers.merge.chat_templates`); any other value is a Jinja template used as given.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from transformers import AutoTokenizer

from workers.merge.chat_templates import NAMED_TEMPLATES
from workers.merge.config import MergeConfig
from workers.merge.vocabulary import VocabularyPlan
from workers.store.model_files import contained
from workers.store.references import is_registry_id
from workers.templates.renderer import TemplateUnusable, check, templates_in

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)


def copy_tokenizer(source: Path, out_dir: Path) -> None:
    """Copy the tokenizer files there are; each must resolve inside `source`."""
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(contained(source, name), out_dir / name)


def chat_template_of(directory: Path) -> str | None:
    try:
        template = AutoTokenizer.from_pretrained(directory).chat_template
    except (OSError, ValueError, TypeError):
        return None
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if template else None


def resolve_chat_template(config: MergeConfig, paths: dict[str, Path]) -> str | None:
    if config.chat_template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[config.chat_template]
    if config.chat_template != "auto":
        return config.chat_template
    templates = [t for ref in config.input_models if (t := chat_template_of(paths[ref]))]
    return Counter(templates).most_common(1)[0][0] if templates else None


def write_tokenizer(
    config: MergeConfig, paths: dict[str, Path], out_dir: Path, vocabulary: VocabularyPlan | None
) -> None:
    """The reference model's tokenizer files as they are; or, when the recipe built a vocabulary or names
    a chat template, that tokenizer saved afresh (plus the reference's generation config). The chat
    template written is checked (`check_output_template`)."""
    _write_tokenizer(config, paths, out_dir, vocabulary)
    check_output_template(config, out_dir)


def check_output_template(config: MergeConfig, out_dir: Path) -> None:
    """A template that came from a model directory given by path was never checked when it was registered
    (registered models' were, at import, and so were recipes' own, at submission): check it before the
    merged model is registered with it. ValueError if it is unusable."""
    if all(is_registry_id(ref) for ref in config.input_models):
        return
    for template in templates_in(out_dir):
        if template.strip() in (t.strip() for t in NAMED_TEMPLATES.values()):
            continue
        try:
            check(template)
        except TemplateUnusable as e:
            raise ValueError(f"the merged model's chat template is unusable ({e})") from e


def _write_tokenizer(
    config: MergeConfig, paths: dict[str, Path], out_dir: Path, vocabulary: VocabularyPlan | None
) -> None:
    reference = paths[config.reference_model]
    template = resolve_chat_template(config, paths) if config.chat_template else None
    if vocabulary is None and template is None:
        copy_tokenizer(reference, out_dir)
        return
    tokenizer = vocabulary.tokenizer if vocabulary is not None else AutoTokenizer.from_pretrained(reference)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
    if (reference / "generation_config.json").is_file():
        shutil.copyfile(reference / "generation_config.json", out_dir / "generation_config.json")
