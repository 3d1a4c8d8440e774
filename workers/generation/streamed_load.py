"""A serving engine built without ever holding the float model whole.

The source model is made on the meta device; its embeddings, final norm and head are read from the
checkpoint, its rotary embedding is computed afresh, and every decoder layer's tensors are read just before
the compact model takes its own (quantised or fused) copies of them and freed right after (`LayerStream`,
which `CompactLlama` calls around each layer). The peak is then the compact model, the embeddings and one
float layer, instead of the whole float model plus the compact one.

It serves LLaMA-layout checkpoints whose tensor names are their modules' names (LLaMA, Qwen2, Mistral and
their kind) and whose only buffers are the rotary embedding's; for anything else `streamed_model` says no
(None) and the model is loaded whole.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from workers.early_exit.forward import decoder_stack
from workers.processes import return_freed_memory
from workers.tensors.safetensors_io import TensorReader


def _storages(tensors: list[torch.Tensor]) -> set[int]:
    kept = set()
    for tensor in tensors:
        try:
            kept.add(tensor.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # a quantized tensor: never a source tensor's storage
            continue
    return kept


def free_unkept(module: nn.Module, kept: list[torch.Tensor]) -> int:
    """Empty the parameters of `module` whose storage none of `kept` uses; the bytes freed."""
    storages, freed = _storages(kept), 0
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.numel() and parameter.untyped_storage().data_ptr() not in storages:
                freed += parameter.numel() * parameter.element_size()
                parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)
    return freed


class LayerStream:
    """Reads decoder layer i's tensors into the source model before the compact model copies them
    (`load`), and frees those it did not keep (`done`)."""

    def __init__(self, reader: TensorReader, prefix: str, dtype: torch.dtype) -> None:
        self.reader, self.prefix, self.dtype = reader, prefix, dtype

    def load(self, index: int, layer: nn.Module) -> None:
        device = next(layer.parameters()).device  # the engine's: it moved the (empty) layer there
        with torch.no_grad():
            for name, parameter in layer.named_parameters():
                parameter.data = self.reader.load(f"{self.prefix}{index}.{name}").to(device, self.dtype)

    def done(self, layer: nn.Module, kept: list[torch.Tensor]) -> None:
        free_unkept(layer, kept)
        # hand the freed pages back now: the heap would otherwise keep them (glibc raises its mmap
        # threshold as large blocks are freed) and the next layers' allocations would not all reuse them
        return_freed_memory()

    def close(self) -> None:
        self.reader.close()


def streamed_model(path: Path, dtype: torch.dtype) -> tuple[nn.Module, LayerStream] | None:
    """The model at `path` with every tensor but its decoder layers' read (those stay empty until the
    LayerStream reads them), or None when its checkpoint is not one this can stream."""
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        inner = decoder_stack(model)
    except TypeError:
        return None
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or inner.layers is None or not len(inner.layers):
        return None
    rotary_buffers = {id(b) for b in rotary.buffers()}
    if any(id(b) not in rotary_buffers for b in model.buffers()):
        return None  # buffers of another kind: not something to rebuild here
    prefix = next(f"{name}." for name, module in model.named_modules() if module is inner.layers)
    reader = TensorReader(path)
    expected = dict(model.named_parameters())  # a tied head is the embedding's parameter, listed once
    for name, parameter in expected.items():
        entry = reader.entries.get(name)
        if entry is None or tuple(entry.shape) != tuple(parameter.shape) or not entry.dtype.is_floating_point:
            return None
    model.to_empty(device="cpu")  # address space only: no page is touched until a tensor is read
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    expected = dict(model.named_parameters())
    with torch.no_grad():
        for name, parameter in expected.items():
            if name.startswith(prefix):
                parameter.data = torch.empty(0, dtype=dtype)
            else:
                parameter.data = reader.load(name).to(dtype)
    inner.rotary_emb = type(rotary)(config=config)  # its buffers computed afresh, on the CPU
    if (Path(path) / "generation_config.json").is_file():  # its EOS ids, as from_pretrained reads them
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model.eval(), LayerStream(reader, prefix, dtype)
