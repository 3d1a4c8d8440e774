"""RQ job: extract a LoRA adapter (model - base, truncated SVD per linear layer) and register it as an
adapter of the base, with the relative reconstruction error of every module."""

from __future__ import annotations

import json
from typing import Any

from workers.device import default_device
from workers.jobs.context import JobContext
from workers.jobs.publish import publish_model
from workers.lora.adapter_delta import AdapterError, adapter_to_delta
from workers.lora.extract import extract_lora
from workers.store.model_store import describe_adapter
from workers.store.references import is_registry_id, resolve_model
from workers.variants_delta import describe_delta


def extract_lora_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    model_dir = resolve_model(spec["model"], ctx.registry, s.models_dir, s.import_roots)
    base_dir = resolve_model(spec["base"], ctx.registry, s.models_dir, s.import_roots)
    base_config = json.loads((base_dir / "config.json").read_text())
    outcome = {}

    def build(out_dir) -> None:
        outcome["result"] = extract_lora(
            model_dir,
            base_dir,
            out_dir,
            base_name=spec["base"],
            max_rank=spec["max_rank"],
            sv_epsilon=spec["sv_epsilon"],
            device=default_device(),
            progress=ctx.progress,
        )
        if is_registry_id(spec["base"]):  # servable over its registered base without merging
            try:
                adapter_to_delta(out_dir, base_dir, out_dir, base_id=spec["base"])
            except AdapterError as e:  # the adapter stands; it is just not served (generation says so)
                ctx.note(f"the adapter is not stored for serving: {e}")

    architecture = (base_config.get("architectures") or [base_config.get("model_type", "unknown")])[0]
    record = publish_model(
        ctx,
        spec["name"],
        build,
        parents=[spec["model"], spec["base"]],
        recipe=spec,
        describe_with=lambda d: {
            **describe_adapter(d, architecture, base_config.get("num_hidden_layers")),
            "delta": describe_delta(d).get("delta"),
        },
        type="adapter",
        base_model=spec["base"],
    )
    result = outcome["result"]
    return {
        "model": record.id,
        "base": spec["base"],
        "rank": result.rank,
        "modules": result.modules,
        "full_rank_modules": result.full_rank,
        "bytes_written": result.bytes_written,
    }
