"""RQ job: fit exit adapters for a registered model, store them with it, record them, profile it afresh."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from workers.device import default_device, describe_device
from workers.early_exit.adapters import FILENAME
from workers.early_exit.fit import FitConfig, default_fit_exits, fit_exit_adapters
from workers.early_exit.fit_data import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEXT,
    MIXES,
    bundled_paths,
    bundled_records,
    fitting_windows,
)
from workers.eval.heldout import DEFAULT_EVAL_TEXT
from workers.generation.profiler import ModelProfile, default_grid
from workers.generation.quality import served_quality
from workers.jobs.context import JobContext
from workers.jobs.models import load_model
from workers.jobs.profile import profile_and_store
from workers.store.delta_only import full_model_dir
from workers.store.file_manifest import verify_files
from workers.store.files import FileStore
from workers.store.references import UnknownModelError, resolve_path
from workers.train.data import read_jsonl

IN_DOMAIN_TEXT, OUT_OF_DOMAIN_TEXT = "heldout", "dpkg-spec"  # profiled after every fit, beside "broad"
# the bundled fitting texts each held-out text shares a source with (none for dpkg-spec, never fitted)
SOURCE_TEXTS = {
    "heldout": {"prose", "everyday"},
    "heldout_prose": {"prose"},
    **{s: {"broad"} for s in ("gnu-manuals", "vim-manual", "python-reference", "python-docstrings", "legal")},
}

CONFIG_KEYS = (  # job fields passed to FitConfig as they are
    "ridge",
    "distill_steps",
    "lr",
    "distill_tokens",
    "distill_batch_tokens",
    "fit_scale",
    "scale_tokens",
    "pointer",
    "pointer_tokens",
    "seed",
)
RECIPE_KEYS = (
    "training_file",
    "exits",
    "bundled",
    "max_tokens",
    "fit_on",
    "seq_len",
    "distill_exits",
    "mix_bundled",
    "user_weight",
    *CONFIG_KEYS,
)


def _records(spec: dict[str, Any], ctx: JobContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The fitting records and a description of where they came from."""
    if spec.get("examples"):
        records = spec["examples"]
        digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]
        return records, {"source": "examples", "records": len(records), "sha256_16": digest}
    if spec.get("training_file"):
        files = FileStore(ctx.settings.files_dir, ctx.settings.max_file_bytes)
        stored = files.get(spec["training_file"])
        records = files.records(stored.id)
        source = {"file": stored.id, "filename": stored.filename, "sha256_16": stored.sha256[:16]}
        return records, {"source": "uploaded", **source, "records": len(records)}
    if spec.get("data"):
        path = resolve_path(spec["data"], ctx.settings.import_roots, directory=False)
        records = read_jsonl(path)
        return records, {"source": "file", "path": str(path), "records": len(records)}
    return _bundled(spec.get("bundled", DEFAULT_TEXT))


def _bundled(text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A bundled fitting text's records and their description."""
    records = bundled_records(text)
    files = [p.name for p in bundled_paths(text)]
    return records, {"source": "bundled", "text": text, "files": files, "records": len(records)}


def fit_exits_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    model_id = spec["model"]
    record = ctx.registry.get(model_id)
    if record is None:
        raise UnknownModelError(f"model {model_id!r} is not registered")
    path = ctx.store.path(model_id)
    verify_files(model_id, path, record.files)
    records, data = _records(spec, ctx)
    model, tokenizer = load_model(full_model_dir(ctx.settings.models_dir, model_id))  # adapters go to `path`
    device = default_device()
    model.to(device)
    texts = [(records, float(spec.get("user_weight", 1.0)))]  # user_weight needs mix_bundled (prechecks)
    mixed = None
    if spec.get("mix_bundled"):  # the user's text, then the bundled text, each up to max_tokens
        bundled, mixed = _bundled(spec.get("bundled", DEFAULT_TEXT))
        texts.append((bundled, 1.0))
    fitting = fitting_windows(
        tokenizer,
        texts,
        spec.get("max_tokens", DEFAULT_MAX_TOKENS),
        spec.get("seq_len", 256),
        spec.get("fit_on") == "responses",
    )
    if mixed is not None:
        data = {
            **data,
            "tokens_user": fitting.tokens[0],
            "user_weight": texts[0][1],
            "bundled": {**mixed, "tokens": fitting.tokens[1]},
        }
    exits = spec.get("exits") or default_fit_exits(record.num_layers or 0)
    config = FitConfig(  # what the spec leaves out keeps FitConfig's default
        **{key: spec[key] for key in CONFIG_KEYS if key in spec},
        distill_exits=tuple(spec["distill_exits"]) if spec.get("distill_exits") else None,
    )

    def progress(message: str, fraction: float) -> None:  # fitting: 80% of the job, profiling: 20%
        ctx.progress(int(fraction * 800), 1000, message)

    fitted = fit_exit_adapters(
        model, fitting.windows, exits, config, progress, fitting.masks, fitting.weights
    )
    adapters, report = fitted.adapters, fitted.report
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    recipe = {key: spec[key] for key in RECIPE_KEYS if key in spec}
    data = {**data, "tokens": sum(fitting.tokens)}
    adapters.save(path, {"recipe": recipe, "data": data})
    record = ctx.registry.get(model_id) or record
    record.exit_adapters = {
        "file": FILENAME,
        "exits": adapters.depths,
        "recipe": recipe,
        "data": data,
        "device": describe_device(device),
        "fit": report.as_dict(),
    }
    ctx.registry.update(record)

    def profiling(message: str, fraction: float) -> None:
        ctx.progress(800 + int(fraction * 200), 1000, f"profiling: {message}")

    # the distilled exits are profiled too (beside the default grid), so that budgets and floors can pick them
    grid = sorted(set(default_grid(record.num_layers or 0)) | set(report.distill_kl))
    also = (IN_DOMAIN_TEXT, OUT_OF_DOMAIN_TEXT)
    profile = profile_and_store(
        ctx, model_id, profiling, also=also, grid=grid, prompt_lengths=(16, 96), decode_tokens=8, repeats=1
    )
    quality = {k: q.model_dump() for k, q in profile.quality.items()}
    return {
        "model": model_id,
        "exits": adapters.depths,
        "data": data,
        "fit": report.as_dict(),
        "quality": quality,
        "eval_text": profile.eval_text,
        "generalisation": generalisation(profile, data),
    }


def generalisation(profile: ModelProfile, data: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per profiled held-out text, each exit's served perplexity ratio to full depth, split into texts from a
    source the fitting text drew on (in-domain) and the others (out-of-domain)."""
    text = data.get("text") if data["source"] == "bundled" else (data.get("bundled") or {}).get("text")
    fitted = set(MIXES.get(text, (text,))) if text else set()
    out: dict[str, dict[str, dict[str, float]]] = {"in_domain": {}, "out_of_domain": {}}
    for name, table in profile.quality_by_text.items():
        if name == DEFAULT_EVAL_TEXT:  # a mix of in- and out-of-domain sources: the profile's own table
            continue
        ratios = {
            str(depth): round(served.perplexity_ratio, 4)
            for depth in sorted(table.quality)
            if depth < profile.num_layers
            and (served := served_quality(table.quality, depth, profile.num_layers)) is not None
        }
        in_domain = bool(SOURCE_TEXTS.get(name, set()) & fitted)
        out["in_domain" if in_domain else "out_of_domain"][name] = ratios
    return out
