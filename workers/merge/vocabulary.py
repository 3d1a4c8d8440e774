"""The output vocabulary of a merge (`tokenizer_source` / `tokenizer:`), and every input's embedding and
LM-head rows moved onto it, as mergekit 0.1.5 does.

Output tokenizer:
- `base`: the base model's tokenizer (the first model's when there is no base);
- `union`: the base's, plus every other model's tokens it lacks (plain tokens in id order, then added
  tokens with their settings, first definition wins);
- `model:<id>`: that model's tokenizer.
Tokens named under `tokenizer.tokens` are added if missing. The output has V = |vocab| rows, rounded up
to `pad_to_multiple_of`.

Rows, per vocabulary tensor (axis 0 of embed_tokens / lm_head), for input model m and output token t:
- m has t and t is not forced: m's own row for t;
- otherwise t's default row: its `tokenizer.tokens` source (a model's row for t, a model's row for a given
  token or id, or zeros) if it has one; else, when only one model has t, that model's row; when none
  has it, zeros; when the base has it, the base's row; else the mean of the rows of the models that have it;
- padding rows (index >= |vocab|) are the mean of m's first |vocab| rows.
The merge method then combines the aligned rows like any other tensor.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from workers.merge.config import MergeConfig, ModelTokenSource, TokenEmbedding, ZeroSource
from workers.merge.homology import VOCABULARY_TENSORS, read_config


class VocabularyError(ValueError):
    """A tokenizer recipe that cannot be carried out on these models."""


def is_vocabulary_tensor(name: str) -> bool:
    return name.endswith(VOCABULARY_TENSORS)


def _load_tokenizer(directory: Path, ref: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as e:
        raise VocabularyError(f"model {ref!r} has no tokenizer that loads") from e


def _rows(directory: Path) -> int | None:
    size = read_config(directory).get("vocab_size")
    return int(size) if isinstance(size, int) else None


def _copy(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A fresh tokenizer equal to `tokenizer` (saved and reloaded, so adding tokens leaves the original)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp)


def _union(
    base: PreTrainedTokenizerBase, tokenizers: dict[str, PreTrainedTokenizerBase], rows: dict[str, int | None]
) -> PreTrainedTokenizerBase:
    plain: dict[str, None] = {}
    added = {}
    for ref, tokenizer in tokenizers.items():
        limit = rows[ref] or tokenizer.vocab_size
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if index < limit:
                plain.setdefault(token)
        for index, info in tokenizer.added_tokens_decoder.items():
            if index < limit:
                added.setdefault(info.content, info)
    out = _copy(base)
    base_vocab = base.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class VocabularyPlan:
    """The output tokenizer and, per input model, the source row of every output token (-1: absent)."""

    tokenizer: PreTrainedTokenizerBase
    size: int  # output rows, padding included
    vocab: dict[str, int]  # output token -> output row
    sources: dict[str, list[int]]  # model reference -> source row per output row (< len(vocab))
    original_vocabs: dict[str, dict[str, int]]
    tokens: dict[str, TokenEmbedding]
    base_model: str | None

    def align(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every model's vocabulary tensor (rows on axis 0) moved onto the output vocabulary."""
        models = list(tensors)
        dtype = tensors[models[0]].dtype
        for tensor in tensors.values():
            dtype = torch.promote_types(dtype, tensor.dtype)
        first = tensors[models[0]]
        row_shape = first.shape[1:]
        if any(t.shape[1:] != row_shape for t in tensors.values()):
            raise VocabularyError("vocabulary tensors differ beyond their rows")
        configs = dict(self.tokens)
        averaged = self._default_sources(models, configs)
        defaults: dict[str, torch.Tensor] = {}
        for token, index in self.vocab.items():
            config = configs.get(token)
            forced = config is not None and config.force
            if not forced and all(self.sources[m][index] >= 0 for m in models):
                continue
            if token in averaged:
                row = torch.zeros(row_shape, dtype=dtype, device=first.device)
                count = 0
                for m in models:
                    if self.sources[m][index] >= 0:
                        row = row + tensors[m][self.sources[m][index]]
                        count += 1
                defaults[token] = row / count
            elif config is not None:
                defaults[token] = self._configured_row(token, index, config, tensors)

        real = len(self.vocab)
        token_at = {index: token for token, index in self.vocab.items()}
        forced = torch.zeros(real, dtype=torch.bool)
        for token, config in configs.items():
            if config.force and token in self.vocab:
                forced[self.vocab[token]] = True
        out = {}
        for m in models:
            source = torch.tensor(self.sources[m], dtype=torch.long)
            own = (source >= 0) & ~forced
            rows = torch.zeros((self.size, *row_shape), dtype=dtype, device=first.device)
            kept = own.nonzero().flatten()
            rows[kept.to(first.device)] = tensors[m][source[kept].to(first.device)].to(dtype)
            for index in (~own).nonzero().flatten().tolist():
                token = token_at[index]
                if token not in defaults:
                    raise VocabularyError(f"no row for token {token!r} in model {m!r}")
                rows[index] = defaults[token]
            if self.size > real:  # padding rows: the mean of the real ones
                rows[real:] = rows[:real].mean(dim=0)
            out[m] = rows
        return out

    def _default_sources(self, models: list[str], configs: dict[str, TokenEmbedding]) -> set[str]:
        """Give tokens some model lacks a default source; return those to average over their owners."""
        averaged = set()
        for token, index in self.vocab.items():
            if token in configs:
                continue
            owners = [m for m in models if self.sources[m][index] >= 0]
            if len(owners) == 1:
                configs[token] = TokenEmbedding(source=owners[0])
            elif not owners:
                configs[token] = TokenEmbedding(source=ZeroSource(kind="zero"))
            elif self.base_model in models and self.sources[self.base_model][index] >= 0:
                configs[token] = TokenEmbedding(source=self.base_model)
            else:
                averaged.add(token)
        return averaged

    def _configured_row(
        self, token: str, index: int, config: TokenEmbedding, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        source = config.source
        if isinstance(source, ZeroSource):
            first = next(iter(tensors.values()))
            return first.new_zeros(first.shape[1:])
        if source is None:
            raise VocabularyError(f"token {token!r} needs a source under tokenizer.tokens")
        model = source.model if isinstance(source, ModelTokenSource) else source
        if model not in tensors:
            raise VocabularyError(f"token {token!r} takes its row from {model!r}, which this tensor lacks")
        if isinstance(source, ModelTokenSource):
            row = source.token_id
            if row is None:
                if source.token not in self.original_vocabs[model]:
                    raise VocabularyError(f"token {source.token!r} is not in the vocabulary of {model!r}")
                row = self.original_vocabs[model][source.token]
            if not 0 <= row < tensors[model].shape[0]:
                raise VocabularyError(f"token id {row} is out of range for model {model!r}")
            return tensors[model][row]
        row = self.sources[model][index]
        if row < 0:
            raise VocabularyError(f"token {token!r} is not in the vocabulary of {model!r}")
        return tensors[model][row]


def builds_vocabulary(config: MergeConfig) -> bool:
    """Whether the recipe builds its own vocabulary (a tokenizer_source or a tokenizer block)."""
    return config.tokenizer_source is not None or config.tokenizer is not None


def build_vocabulary(config: MergeConfig, paths: dict[str, Path]) -> VocabularyPlan | None:
    """The output vocabulary for `config`, or None when it keeps the reference model's (no tokenizer_source
    and no tokenizer block)."""
    if not builds_vocabulary(config):
        return None
    settings = config.tokenizer
    source = settings.source if settings is not None else config.tokenizer_source
    base_ref = config.reference_model
    refs = config.input_models
    rows = {ref: _rows(paths[ref]) for ref in refs}
    base = _load_tokenizer(paths[base_ref], base_ref)
    base_limit = rows[base_ref] or len(base.get_vocab())
    beyond = [t for t, i in base.get_vocab().items() if i >= base_limit]
    if beyond:
        raise VocabularyError(
            f"the tokenizer of {base_ref!r} has {len(beyond)} tokens beyond its {base_limit} embedding rows"
        )
    tokenizers = {base_ref: base}
    for ref in refs:
        if ref != base_ref:
            try:
                tokenizers[ref] = _load_tokenizer(paths[ref], ref)
            except VocabularyError:
                pass  # as mergekit: a model without a tokenizer is taken to share the base's
    original_vocabs = {ref: tok.get_vocab() for ref, tok in tokenizers.items()}

    if source == "base":
        out = _copy(base)
    elif source == "union":
        out = _union(base, tokenizers, rows)
    else:
        ref = source.removeprefix("model:")
        out = _copy(tokenizers[ref]) if ref in tokenizers else _load_tokenizer(paths[ref], ref)
    tokens = dict(settings.tokens or {}) if settings is not None else {}
    existing = set(out.get_vocab())
    for token in tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)

    vocab = out.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise VocabularyError("the output tokenizer's ids are not contiguous")
    size = len(vocab)
    multiple = settings.pad_to_multiple_of if settings is not None else None
    if multiple and size % multiple:
        size += multiple - size % multiple
    sources = {}
    for ref in refs:
        model_vocab = original_vocabs.get(ref, original_vocabs[base_ref])
        limit = rows[ref] or len(model_vocab)
        row_of = [-1] * len(vocab)
        for token, index in vocab.items():
            row = model_vocab.get(token, -1)
            row_of[index] = row if row < limit else -1
        sources[ref] = row_of
    base_model = config.base_model if config.base_model else None
    return VocabularyPlan(out, size, vocab, sources, original_vocabs, tokens, base_model)
