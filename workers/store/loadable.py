"""Whether a model directory holds a model Strata can load and serve, checked before it is registered.

Headers consistent with their files (safetensors_io) is not enough: a directory whose weights do not fit
its config loads with transformers filling the gaps with random values, and serves noise. Here the model
the config describes is built on the meta device (no memory) and its parameters are compared with the
weights, name by name and shape by shape; the architecture must be a causal LM with a LLaMA-style decoder
(what the engine, pruning and merging work on); a tokenizer shipped with the model must load, encode and
decode.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from workers.early_exit.forward import decoder_stack
from workers.store.model_files import ModelFileError, read_config, shown
from workers.tensors.safetensors_io import TensorReader

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PROBE = "Strata checks the tokenizer: 123 abc."
LISTED = 3  # names shown in an error at most


class UnloadableModelError(ModelFileError):
    """The directory is not a model Strata can load as it is (config, weights or tokenizer)."""


def _names(names: list[str]) -> str:
    more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
    return ", ".join(shown(n) for n in names[:LISTED]) + more


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return shown(lines[0], 160) if lines else type(e).__name__


def check_architecture(directory: Path) -> torch.nn.Module:
    """The model config.json describes, built on the meta device; UnloadableModelError if the config lacks
    num_hidden_layers, names an architecture Strata cannot load, or transformers refuses it."""
    config = read_config(directory)
    if config.get("num_hidden_layers") is None:
        raise UnloadableModelError("config.json has no num_hidden_layers")
    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnloadableModelError(f"config.json: model_type {shown(model_type, 40)} is not a causal LM")
    try:
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    except Exception as e:  # transformers' own check of the config
        raise UnloadableModelError(
            f"config.json is not a loadable {model_type} config: {_first_line(e)}"
        ) from e
    try:
        decoder_stack(model)
    except TypeError as e:
        raise UnloadableModelError(f"{model_type} has no LLaMA-style decoder Strata can run") from e
    return model


def check_weights_fit(directory: Path, model: torch.nn.Module) -> None:
    """Every parameter the config implies is in the weights with its shape (tied ones may be left out),
    and the weights hold nothing else."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = getattr(model, "_tied_weights_keys", None) or ()
    optional = set(tied) if getattr(model.config, "tie_word_embeddings", False) else set()
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    entries = TensorReader(directory).entries
    missing = [n for n in expected if n not in entries and n not in optional]
    if missing:
        raise UnloadableModelError(f"the weights lack {_names(missing)}, which the config implies")
    unexpected = [n for n in entries if n not in expected and not any(p.search(n) for p in ignored)]
    if unexpected:
        raise UnloadableModelError(f"the weights hold {_names(unexpected)}, which the config does not have")
    for name, shape in expected.items():
        if name in entries and entries[name].shape != shape:
            raise UnloadableModelError(
                f"tensor {shown(name)} has shape {list(entries[name].shape)}; "
                f"the config implies {list(shape)}"
            )


def check_tokenizer(directory: Path) -> None:
    """A shipped tokenizer loads, encodes a probe text and decodes it. (Ids beyond the embeddings are
    refused per request, naming them: see the generation prechecks.)"""
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        ids = tokenizer.encode(PROBE, add_special_tokens=False)
        text = tokenizer.decode(ids)
    except Exception as e:
        raise UnloadableModelError(f"the tokenizer does not load, encode and decode: {_first_line(e)}") from e
    if not ids or not isinstance(text, str):
        raise UnloadableModelError("the tokenizer encodes text to no tokens")


def check_loadable(directory: Path) -> None:
    """UnloadableModelError (a one-line reason, no file contents) unless Strata can load and serve it."""
    model = check_architecture(directory)
    check_weights_fit(directory, model)
    check_tokenizer(directory)
