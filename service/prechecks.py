"""Checks made before a job is queued, so a bad request fails now with a 4xx, not later in a worker."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from fastapi import HTTPException

from service.eval_texts import check_eval_text
from service.schemas import (
    DistillJobRequest,
    ExtractLoraJobRequest,
    FinetuneJobRequest,
    FitExitsJobRequest,
    GrowJobRequest,
    HealOptions,
    MaterialiseJobRequest,
    MergeJobRequest,
    MoeJobRequest,
    ProfileJobRequest,
    PruneJobRequest,
    SortJobRequest,
    SparsifyJobRequest,
    TeacherEndpointRef,
    TruncateJobRequest,
    VariantsJobRequest,
)
from service.template_checks import check_or_422
from workers.distill.student import check_tokenizer
from workers.distill.teacher import endpoint_for
from workers.early_exit.fit import default_fit_exits
from workers.early_exit.fit_data import BUNDLED, enough_tokens
from workers.jobs.distill import distill_data
from workers.merge import METHODS
from workers.merge.config import MODEL_ID
from workers.merge.executor import DTYPES, MissingParameterError, tensor_parameters
from workers.merge.homology import HomologyError, check_homologous
from workers.merge.plan import SliceError, plan_merge
from workers.merge.vocabulary import VocabularyError, build_vocabulary, builds_vocabulary
from workers.moe.build import check_moe_inputs, output_bytes
from workers.moe.layouts import LayoutError
from workers.moe.routers import RouterError
from workers.prune.prune import target_shape
from workers.prune.shear import Shape, check_shape, shape_of_model
from workers.prune.target import PruneTarget, plan
from workers.settings import Settings
from workers.store.file_manifest import ModelFilesChangedError, verify_files
from workers.store.files import TRAINING, FileContentError, FileNotFound, FileStore
from workers.store.loadable import check_architecture
from workers.store.model_files import read_config, shown
from workers.store.model_store import lora_bytes, max_rank, weights_bytes
from workers.store.references import ModelReferenceError, resolve_model, resolve_path
from workers.store.registry import ModelRecord, Registry
from workers.tensors.safetensors_io import stored_delta_base
from workers.train.data import DataError, iter_jsonl, read_jsonl, validate_record
from workers.train.sorted_ft import default_exits


def resolve_or_422(ref: str, registry: Registry, settings: Settings) -> Path:
    """The model's directory for the checks (config and headers); a variant stored as its delta alone is
    read by the job as a materialised copy in the store, which must fit on its disk too."""
    try:
        path = resolve_model(ref, registry, settings.models_dir, settings.import_roots, tensors=False)
    except ModelReferenceError as e:
        raise HTTPException(422, str(e)) from e
    except ModelFilesChangedError as e:
        raise HTTPException(409, str(e)) from e
    if stored_delta_base(path) is not None:
        ensure_disk(weights_bytes(path), settings)
    return path


def ensure_intact(record: ModelRecord, settings: Settings) -> None:
    """The model's files are the ones registered (for jobs that read a record, not a reference)."""
    try:
        verify_files(record.id, settings.models_dir / record.id, record.files)
    except ModelFilesChangedError as e:
        raise HTTPException(409, str(e)) from e


def ensure_valid_id(model_id: str, field: str) -> None:
    """A name derived from a directory (a default output name) passes the same check as a given id."""
    if not MODEL_ID.match(model_id):
        raise HTTPException(
            422,
            f"the output id derived from the input, {shown(model_id)}, is not a valid model id (letters, "
            f"digits, '.', '_', '-'; at most 128); give {field}",
        )


def ensure_free(model_id: str, registry: Registry) -> None:
    if registry.exists(model_id):
        raise HTTPException(409, f"model {model_id!r} already exists; choose another name or delete it first")


def ensure_disk(needed_bytes: int, settings: Settings) -> None:
    """The new model must fit on the store's disk with STRATA_MIN_FREE_BYTES to spare."""
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.models_dir).free
    if needed_bytes + settings.min_free_bytes > free:
        raise HTTPException(
            507,
            f"not enough disk for the output: needs {needed_bytes:,} bytes plus "
            f"{settings.min_free_bytes:,} to keep free (STRATA_MIN_FREE_BYTES), {free:,} free on the store's "
            "disk",
        )


def ensure_distinct(field: str, values: list[int] | None) -> None:
    """A list of depths names each depth once (so its length is bounded by the model's depth)."""
    if values and len(set(values)) != len(values):
        raise HTTPException(422, f"{field} lists a depth more than once")


def ensure_memory(needed_bytes: int, what: str) -> None:
    """What a job's options make it hold in memory must not exceed this machine's memory (a rough, low
    estimate: it stops requests that cannot run, such as terabytes of logits, not tight ones)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed_bytes > total:
        raise HTTPException(
            422,
            f"these options need about {needed_bytes:,} bytes of memory ({what}); this machine has {total:,}",
        )


def check_merge(request: MergeJobRequest, registry: Registry, settings: Settings) -> None:
    listed = len(request.models or []) + sum(len(s.sources) for s in request.slices or [])
    if listed > settings.max_merge_models:
        raise HTTPException(
            422,
            f"the recipe lists {listed} models; at most {settings.max_merge_models} "
            "(STRATA_MAX_MERGE_MODELS)",
        )
    check_or_422(request.chat_template, "chat_template")
    paths = {ref: resolve_or_422(ref, registry, settings) for ref in request.input_models}
    own_vocabulary = builds_vocabulary(request)
    try:
        plan = plan_merge(request, paths)  # embedding / LM-head rows may differ when own_vocabulary
        method = METHODS[request.merge_method]
        for planned in plan.tensors:
            if planned.entry.dtype.is_floating_point:
                tensor_parameters(request, method, planned)
    except SliceError as e:
        raise HTTPException(422, f"slices do not fit the models: {e}") from e
    except HomologyError as e:
        raise HTTPException(422, f"models are not homologous: {e}") from e
    except MissingParameterError as e:
        raise HTTPException(422, str(e)) from e
    vocab_rows = None
    if own_vocabulary:
        try:
            vocab_rows = build_vocabulary(request, paths).size
        except VocabularyError as e:
            raise HTTPException(422, str(e)) from e
    if request.name:
        ensure_free(request.name, registry)
    out_dtype = request.out_dtype or request.dtype
    ensure_disk(plan.output_bytes(DTYPES.get(out_dtype), vocab_rows), settings)


def check_moe(request: MoeJobRequest, registry: Registry, settings: Settings) -> None:
    paths = {ref: resolve_or_422(ref, registry, settings) for ref in request.input_models}
    try:
        check_moe_inputs(request, paths)
    except HomologyError as e:
        raise HTTPException(422, f"experts are not homologous: {e}") from e
    except (LayoutError, RouterError) as e:
        raise HTTPException(422, str(e)) from e
    if request.name:
        ensure_free(request.name, registry)
    ensure_disk(output_bytes(request, paths[request.base_model]), settings)


def check_variants(request: VariantsJobRequest, registry: Registry, settings: Settings) -> None:
    if request.prefix is None:
        request.prefix = f"{request.base.rstrip('/').rsplit('/', 1)[-1]}-variant"
    for model_id in request.output_ids:
        ensure_valid_id(model_id, "prefix")
        ensure_free(model_id, registry)
    source = resolve_or_422(request.base, registry, settings)
    if request.rank is not None:
        top = max_rank(source)
        if request.rank > top:
            raise HTTPException(
                422, f"rank {request.rank} exceeds the model's largest full rank ({top}); give 1..{top}"
            )
    ensure_disk(request.count * weights_bytes(source), settings)


def check_profile(request: ProfileJobRequest, registry: Registry, settings: Settings) -> None:
    record = registry.get(request.model)
    if record is None:
        raise HTTPException(422, f"model {request.model!r} is not registered (see GET /v1/models)")
    if record.type == "adapter":
        raise HTTPException(422, f"{request.model!r} is a LoRA adapter, not a model")
    ensure_intact(record, settings)
    if request.grid and not all(1 <= k <= (record.num_layers or 0) for k in request.grid):
        raise HTTPException(422, f"grid depths must lie in 1..{record.num_layers}")
    ensure_distinct("grid", request.grid)
    if request.eval_text is not None:
        files = FileStore(settings.files_dir, settings.max_file_bytes)
        check_eval_text(request.eval_text, settings.models_dir / request.model, settings.import_roots, files)


def _default_name(request, suffix: str, registry: Registry) -> None:
    if request.name is None:
        request.name = f"{request.model.rstrip('/').rsplit('/', 1)[-1]}-{suffix}-{uuid.uuid4().hex[:6]}"
    ensure_valid_id(request.name, "name")
    ensure_free(request.name, registry)


def _layers(path: Path) -> dict:
    return read_config(path)


def check_sparsify(request: SparsifyJobRequest, registry: Registry, settings: Settings) -> None:
    paths = {ref: resolve_or_422(ref, registry, settings) for ref in (request.base, request.model)}
    try:
        check_homologous(paths)
    except HomologyError as e:
        raise HTTPException(422, f"model and base are not homologous: {e}") from e
    _default_name(request, request.method, registry)
    ensure_disk(weights_bytes(paths[request.model]), settings)


def check_prune(request: PruneJobRequest, registry: Registry, settings: Settings) -> None:
    path = resolve_or_422(request.model, registry, settings)
    config = _layers(path)
    target = request.target
    learned_only = {
        "hidden_size": target.hidden_size,
        "num_attention_heads": target.num_attention_heads,
        "target_model": target.target_model,
    }
    given = [key for key, value in learned_only.items() if value is not None]
    if given and request.mode != "learned":
        raise HTTPException(422, f"target {', '.join(given)} needs mode learned")
    if request.mode == "learned" and request.replace is not None:
        raise HTTPException(422, "replace does not combine with mode learned")
    if request.masks is not None and request.mode != "learned":
        raise HTTPException(422, "masks (the mask phase) needs mode learned")
    sizes = target.model_dump(exclude={"target_model", "axes"})
    if target.target_model is not None:
        other = resolve_or_422(target.target_model, registry, settings)
        try:
            sizes = shape_of_model(config, read_config(other))
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
    source = {
        "num_hidden_layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "num_attention_heads": config.get("num_attention_heads"),
        "intermediate_size": config.get("intermediate_size"),
        "num_key_value_heads": config.get("num_key_value_heads", config.get("num_attention_heads")),
    }
    for key, have in source.items():
        want = sizes.get(key)
        if want is not None and have is not None and want > have:
            raise HTTPException(
                422, f"target {key}={want} exceeds the source's {have}; use a grow job to grow"
            )
    heads, kv = (
        sizes.get("num_attention_heads"),
        sizes.get("num_key_value_heads") or source["num_key_value_heads"],
    )
    if heads is not None and kv and heads % kv:
        raise HTTPException(
            422, f"target num_attention_heads={heads} is not divisible into num_key_value_heads={kv} groups"
        )
    if request.replace is not None:
        _check_replace(request, source["num_hidden_layers"])
    if target.param_budget is not None or request.mode == "learned":  # the shape, on the meta device
        try:
            model = check_architecture(path)
            prune_target = PruneTarget.model_validate({**sizes, "axes": target.axes})
            if request.mode == "learned":
                shape = target_shape(model, prune_target)
                check_shape(Shape.of(model.config), shape)
                if shape == Shape.of(model.config):
                    raise ValueError("the target shape equals the source's: nothing to prune")
            else:
                plan(model, prune_target)
        except ValueError as e:
            raise HTTPException(422, f"target: {e}") from e
    if request.heal is not None:
        _check_domains(request.heal, settings)
    _default_name(request, "pruned", registry)
    ensure_disk(weights_bytes(path), settings)


def _check_domains(heal: HealOptions, settings: Settings) -> None:
    """Domains are bundled texts by name, or JSONL files under an import root whose records are valid."""
    for item in heal.domains or []:
        name, path = (item, None) if isinstance(item, str) else (item.name, item.path)
        if path is None and name not in BUNDLED:
            raise HTTPException(
                422, f"unknown domain {shown(name)}: give a path, or one of {', '.join(BUNDLED)}"
            )
        if path is not None:
            try:
                read_jsonl(resolve_path(path, settings.import_roots, directory=False))
            except (ModelReferenceError, DataError) as e:
                raise HTTPException(422, f"domain {shown(name)}: {e}") from e


def _check_replace(request: PruneJobRequest, layers: int | None) -> None:
    """Block replacement needs a depth cut (a block of at least 2 layers), and a block_start whose block
    of L0 - L + 1 layers ends inside the L0-layer stack."""
    target = request.target
    if not layers:
        return
    if target.num_hidden_layers is not None:
        size = layers - target.num_hidden_layers + 1
        if size < 2:
            raise HTTPException(
                422,
                f"replace needs a depth cut: target num_hidden_layers={target.num_hidden_layers} keeps "
                f"all {layers} layers",
            )
    elif target.param_budget is not None and "depth" in target.axes:
        size = 2  # the planner decides how many; at least two layers make a block
    else:
        raise HTTPException(
            422, "replace needs a depth cut: give num_hidden_layers, or a param_budget with depth in axes"
        )
    start = request.replace.block_start if request.replace is not None else None
    if start is not None and start + size > layers:
        raise HTTPException(
            422,
            f"replace.block_start={start}: a block of {size} layers from there crosses the end of the "
            f"{layers}-layer stack (last start: {layers - size})",
        )


def check_grow(request: GrowJobRequest, registry: Registry, settings: Settings) -> None:
    path = resolve_or_422(request.model, registry, settings)
    config = _layers(path)
    layers, width = config.get("num_hidden_layers", 0), config.get("intermediate_size", 0)
    if request.insert_after and not all(0 <= i < layers for i in request.insert_after):
        raise HTTPException(422, f"insert_after indices must lie in 0..{layers - 1}")
    if request.intermediate_size is not None and request.intermediate_size < width:
        raise HTTPException(
            422, f"intermediate_size {request.intermediate_size} is below the current {width}"
        )
    _default_name(request, "grown", registry)
    growth = 1 + len(request.insert_after or []) / max(layers, 1)
    if request.intermediate_size:
        growth *= request.intermediate_size / max(width, 1)
    # the job holds the source and the grown model in float32 (twice a 16-bit model's bytes)
    ensure_memory(int(2 * weights_bytes(path) * (1 + growth)), "the source and grown model")
    ensure_disk(int(weights_bytes(path) * growth), settings)


def check_sort(request: SortJobRequest, registry: Registry, settings: Settings) -> None:
    path = resolve_or_422(request.model, registry, settings)
    layers = _layers(path).get("num_hidden_layers", 0)
    if request.exits and not all(1 <= k <= layers for k in request.exits):
        raise HTTPException(422, f"exits must lie in 1..{layers}")
    ensure_distinct("exits", request.exits)
    # every exit's float32 logits for a batch of batch_size x seq_len tokens, kept for the backward pass
    exits = len(request.exits or default_exits(layers)) if layers else 1
    vocab = _layers(path).get("vocab_size") or 0
    logits = request.batch_size * request.seq_len * vocab * 4 * exits
    ensure_memory(logits, "batch_size x seq_len x vocab_size x exits, for the logits")
    if request.data:
        try:
            resolve_path(request.data, settings.import_roots, directory=False)
        except ModelReferenceError as e:
            raise HTTPException(422, str(e)) from e
    if request.steps and request.epochs:
        raise HTTPException(422, "give steps or epochs, not both")
    _default_name(request, "sorted", registry)
    ensure_disk(weights_bytes(path), settings)


def check_truncate(request: TruncateJobRequest, registry: Registry, settings: Settings) -> None:
    path = resolve_or_422(request.model, registry, settings)
    layers = _layers(path).get("num_hidden_layers", 0)
    if not request.num_layers <= layers:
        raise HTTPException(422, f"num_layers must lie in 1..{layers}")
    _default_name(request, f"exit{request.num_layers}", registry)
    ensure_disk(weights_bytes(path), settings)


def check_materialise(request: MaterialiseJobRequest, registry: Registry, settings: Settings) -> None:
    path = resolve_or_422(request.model, registry, settings)
    if stored_delta_base(path) is None:
        raise HTTPException(
            422, f"model {request.model!r} holds its full weights; download them from its /files"
        )
    _default_name(request, "full", registry)
    ensure_disk(weights_bytes(path), settings)


def check_examples(examples: list[dict] | None) -> None:
    """Inline records are well-formed."""
    for number, record in enumerate(examples or []):
        try:
            validate_record(record)
        except DataError as e:
            raise HTTPException(422, f"examples[{number}]: {e}") from e


def check_training_data(examples: list[dict] | None, data: str | None, settings: Settings) -> None:
    """Inline records are well-formed; a data file lies under an import root."""
    check_examples(examples)
    if data:
        try:
            resolve_path(data, settings.import_roots, directory=False)
        except ModelReferenceError as e:
            raise HTTPException(422, str(e)) from e


def check_fit_exits(request: FitExitsJobRequest, registry: Registry, settings: Settings) -> None:
    record = registry.get(request.model)
    if record is None:
        raise HTTPException(422, f"model {request.model!r} is not registered (see GET /v1/models)")
    ensure_intact(record, settings)
    layers = record.num_layers or 0
    if layers < 2:
        raise HTTPException(422, f"model {request.model!r} has no exit below full depth")
    if request.exits and not all(1 <= k < layers for k in request.exits):
        raise HTTPException(422, f"exits must lie in 1..{layers - 1} (full depth never has an adapter)")
    ensure_distinct("exits", request.exits)
    ensure_distinct("distill_exits", request.distill_exits)
    fitted = set(request.exits or default_fit_exits(layers))
    if request.distill_exits and not set(request.distill_exits) <= fitted:
        raise HTTPException(422, "distill_exits must be among the fitted exits")
    if request.distill_steps:
        config = read_config(resolve_or_422(request.model, registry, settings))
        hidden, vocab = config.get("hidden_size") or 0, config.get("vocab_size") or 0
        distilled = len(request.distill_exits or fitted)
        # cached residual streams (each distilled exit and full depth), and a batch's teacher and student
        # log-probabilities with their gradients
        cache = request.distill_tokens * hidden * (distilled + 1) * 4
        batch = request.distill_batch_tokens * vocab * 4 * 4
        ensure_memory(
            cache + batch, "distill_tokens x hidden size x distilled exits + distill_batch_tokens x vocab"
        )
    given = [k for k in ("training_file", "data", "examples") if getattr(request, k)]
    if len(given) > 1:
        raise HTTPException(422, f"give one of training_file, data or examples, not {' and '.join(given)}")
    if request.mix_bundled and not given:
        raise HTTPException(422, "mix_bundled needs your text: training_file, data or examples")
    if request.user_weight != 1.0 and not request.mix_bundled:
        raise HTTPException(422, "user_weight weighs your text against the bundled: it needs mix_bundled")
    check_examples(request.examples)
    records = user_fitting_records(request, settings)  # resolves a data file or an uploaded one
    if records is not None:
        from service.generation.runner import load_tokenizer  # the API's cached tokenizers

        path = resolve_or_422(request.model, registry, settings)
        tokenizer = load_tokenizer(path, (path / "config.json").stat().st_mtime)
        try:
            count = enough_tokens(tokenizer, records, request.seq_len)
        except DataError as e:
            raise HTTPException(422, f"{given[0]}: {e}") from e
        if count < request.seq_len:
            raise HTTPException(
                422, f"the fitting text has {count} tokens; at least one window of seq_len={request.seq_len}"
            )


def user_fitting_records(request: FitExitsJobRequest, settings: Settings) -> Iterable[dict] | None:
    """The user's fitting records, read lazily (an uploaded file, a file under an import root, or inline),
    None for a bundled text; 422 for a file that is missing or of another purpose."""
    if request.examples:
        return request.examples
    try:
        if request.training_file:
            files = FileStore(settings.files_dir, settings.max_file_bytes)
            files.of_purpose(request.training_file, TRAINING)
            return iter_jsonl(files.content_path(request.training_file))
        if request.data:
            return iter_jsonl(resolve_path(request.data, settings.import_roots, directory=False))
    except (FileNotFound, FileContentError, ModelReferenceError) as e:
        raise HTTPException(422, f"{'training_file' if request.training_file else 'data'}: {e}") from e
    return None


def check_extract_lora(request: ExtractLoraJobRequest, registry: Registry, settings: Settings) -> None:
    paths = {ref: resolve_or_422(ref, registry, settings) for ref in (request.base, request.model)}
    try:
        check_homologous(paths)
    except HomologyError as e:
        raise HTTPException(422, f"model and base are not homologous: {e}") from e
    _default_name(request, "lora", registry)
    ensure_disk(lora_bytes(paths[request.model], request.max_rank), settings)


MAX_FINETUNE_STEPS = 100_000


def check_finetune(request: FinetuneJobRequest, registry: Registry, settings: Settings) -> None:
    """The model resolves, one data source is given and exists, the run is at most MAX_FINETUNE_STEPS
    optimiser steps, the output id is free and fits on disk (float32)."""
    path = resolve_or_422(request.model, registry, settings)
    given = [k for k in ("training_file", "data", "examples") if getattr(request, k)]
    if len(given) != 1:
        raise HTTPException(422, "give exactly one of training_file, data or examples")
    if request.validation_file and request.validation_fraction:
        raise HTTPException(422, "give validation_file or validation_fraction, not both")
    files = FileStore(settings.files_dir, settings.max_file_bytes)
    records = len(request.examples) if request.examples else None
    for key in ("training_file", "validation_file"):
        file_id = getattr(request, key)
        if file_id:
            try:
                stored = files.of_purpose(file_id, TRAINING)
            except (FileNotFound, FileContentError) as e:
                raise HTTPException(422, f"{key}: {e}") from e
            records = stored.records if key == "training_file" else records
    check_training_data(request.examples, request.data, settings)
    steps = request.train_config().total_steps(records) if records else request.steps
    if steps is not None and steps > MAX_FINETUNE_STEPS:
        raise HTTPException(
            422, f"the run would take {steps:,} optimiser steps; at most {MAX_FINETUNE_STEPS:,}"
        )
    _default_name(request, f"ft-{request.suffix}" if request.suffix else "ft", registry)
    ensure_disk(weights_bytes(path, torch.float32), settings)


def check_distill(request: DistillJobRequest, registry: Registry, settings: Settings) -> None:
    """The student (and a model teacher) resolve, an endpoint teacher is configured and allowed, both
    record files are well-formed for the task, the evaluation records have gold labels, "data" brings
    rationales, the student's tokenizer can spell the [label] / [rationale] format, the run is bounded,
    the output id is free and fits on disk (float32)."""
    from transformers import AutoTokenizer

    path = resolve_or_422(request.student, registry, settings)
    teacher = request.teacher
    if isinstance(teacher, TeacherEndpointRef):
        try:
            endpoint_for(teacher.endpoint, settings.teacher_endpoints, settings.teacher_hosts)
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
    elif not isinstance(teacher, str):
        layers = _layers(resolve_or_422(teacher.model, registry, settings)).get("num_hidden_layers", 0)
        if teacher.depth is not None and teacher.depth > layers:
            raise HTTPException(422, f"teacher.depth must lie in 1..{layers}")
    files = FileStore(settings.files_dir, settings.max_file_bytes)
    loaded = {}
    for key in ("train_file", "eval_file"):
        try:
            loaded[key], _ = distill_data(getattr(request, key), files, settings.import_roots, request.task)
        except (DataError, FileNotFound, ModelReferenceError) as e:
            raise HTTPException(422, f"{key}: {e}") from e
    if any("label" not in r for r in loaded["eval_file"]):
        raise HTTPException(422, "eval_file: every evaluation record needs a gold label")
    if teacher == "data" and not any("rationale" in r and "label" in r for r in loaded["train_file"]):
        raise HTTPException(422, 'teacher "data" needs training records with a rationale and a label')
    if "label_only" in request.baselines and not any("label" in r for r in loaded["train_file"]):
        raise HTTPException(422, "the label_only baseline needs training records with gold labels")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        check_tokenizer(tokenizer, loaded["train_file"][:8] + loaded["eval_file"][:8])
    except DataError as e:
        raise HTTPException(422, f"student: {e}") from e
    except (OSError, ValueError) as e:
        raise HTTPException(422, "student: its tokenizer could not be loaded") from e
    steps = request.train_config().total_steps(2 * len(loaded["train_file"]))
    runs = 1 + len(set(request.baselines))
    if steps * runs > MAX_FINETUNE_STEPS:
        raise HTTPException(
            422, f"the runs would take {steps * runs:,} optimiser steps; at most {MAX_FINETUNE_STEPS:,}"
        )
    if request.name is None:
        request.name = f"{request.student.rstrip('/').rsplit('/', 1)[-1]}-sbs-{uuid.uuid4().hex[:6]}"
    ensure_valid_id(request.name, "name")
    ensure_free(request.name, registry)
    ensure_disk(weights_bytes(path, torch.float32), settings)


PRECHECKS = {
    "distill": check_distill,
    "finetune": check_finetune,
    "fit_exits": check_fit_exits,
    "sort": check_sort,
    "truncate": check_truncate,
    "materialise": check_materialise,
    "merge": check_merge,
    "moe": check_moe,
    "variants": check_variants,
    "profile": check_profile,
    "sparsify": check_sparsify,
    "prune": check_prune,
    "grow": check_grow,
    "extract_lora": check_extract_lora,
}
