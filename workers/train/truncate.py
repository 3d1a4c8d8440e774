"""Cut a LLaMA-layout model after its first n decoder layers into a standalone Hugging Face model.

The result keeps the embeddings, layers 1..n, the final norm and the LM head, so its logits are exactly the
exit-n logits LMHead(FinalNorm(h_n)) of the source; after Sorted Fine-Tuning that exit is a usable model on
its own. Tensors are streamed one at a time (never the whole model in memory); config.json gets
num_hidden_layers = n and, where present, layer_types (and Qwen2's max_window_layers) trimmed to n;
tokenizer and generation files are copied unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from workers.store.model_files import contained, read_config
from workers.tensors.safetensors_io import PlannedTensor, SafetensorsError, ShardedWriter, TensorReader

LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def layer_of(name: str) -> int | None:
    """The decoder-layer index in a tensor name such as model.layers.7.mlp.up_proj.weight, else None."""
    match = LAYER_KEY.search(name)
    return int(match.group(1)) if match else None


def truncated_config(config: dict, n: int) -> dict:
    """The config dict for the first n layers."""
    layers = config.get("num_hidden_layers")
    if layers is None:
        raise SafetensorsError("config.json has no num_hidden_layers")
    if not 1 <= n <= layers:
        raise ValueError(f"n must be between 1 and {layers}, got {n}")
    out = dict(config)
    out["num_hidden_layers"] = n
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = out["layer_types"][:n]
    if isinstance(out.get("max_window_layers"), int):
        out["max_window_layers"] = min(out["max_window_layers"], n)
    return out


def truncate_model(source_dir: str | Path, out_dir: str | Path, n: int) -> Path:
    """Write layers 1..n + final norm + head of the model in `source_dir` to `out_dir`; returns out_dir."""
    source, out = Path(source_dir), Path(out_dir)
    config = read_config(source)
    new_config = truncated_config(config, n)
    out.mkdir(parents=True, exist_ok=True)
    with TensorReader(source) as reader:
        names = [name for name in reader.names if (layer_of(name) is None or layer_of(name) < n)]
        if not any(layer_of(name) == n - 1 for name in names):
            raise SafetensorsError(f"{source} has no tensors of decoder layer {n - 1}")
        plan = [PlannedTensor(name, reader.entries[name].dtype, reader.entries[name].shape) for name in names]
        writer = ShardedWriter(out, plan)
        try:
            for name in names:
                writer.write(name, reader.load(name))
        except BaseException:
            writer.abort()
            raise
        writer.close()
    (out / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    for name in COPIED_FILES:
        if (source / name).exists():
            shutil.copyfile(contained(source, name), out / name)
    return out
