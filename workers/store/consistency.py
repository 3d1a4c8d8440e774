"""The store and the registry change together: a failure leaves the old state or the new one, never half.

Publishing: the finished directory is renamed into place, then registered; if registering fails (the id
taken, a parent deleted, Redis gone) the directory is removed again. Deleting: the directory is renamed
out of sight first (a failure changes nothing), then unregistered (a failure renames it back), then its
files are removed (a failure leaves only an unreachable trash directory, cleaned at the next start).
At startup `reconcile` reports and quarantines what an older crash may have left: registry records whose
directory is gone, and directories no record names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from workers.store.model_store import ModelStore, store_error
from workers.store.registry import BaseInUseError, ModelRecord, Registry

log = logging.getLogger("strata")

ORPHANS = ".orphans"
ORPHAN_GRACE_S = 600.0  # a directory younger than this may be a publish between its rename and register


def register_placed(
    store: ModelStore, registry: Registry, record: ModelRecord, require: list[str] | tuple[str, ...] = ()
) -> bool:
    """Register a model whose directory was just moved into the store; its directory is removed again if
    it is not registered (False: the id was taken; or any exception, re-raised)."""
    try:
        added = registry.add(record, require=require)
    except BaseException:
        with contextlib.suppress(OSError):
            store.remove(record.id)
        raise
    if not added:
        with contextlib.suppress(OSError):
            store.remove(record.id)
    return added


def delete_registered(store: ModelStore, registry: Registry, model_id: str) -> None:
    """Unregister a model and remove its files, in an order where any failure leaves it either fully
    registered with its files or gone. StoreError (nothing changed) when its directory cannot be
    moved; BaseInUseError (nothing changed) while a variant is stored as it + a delta alone."""
    dependent = registry.variants_of(model_id)
    if dependent:  # said before anything moves; the atomic check is registry.remove's
        raise BaseInUseError(
            f"model {model_id!r} is the base of {dependent[0]!r}"
            + (f" and {len(dependent) - 1} more" if len(dependent) > 1 else "")
            + ", stored as deltas to it; delete or materialise those first"
        )
    try:
        trash = store.retire(model_id)
    except OSError as e:
        raise store_error(e, "to move the model's files; nothing changed") from None
    try:
        registry.remove(model_id)
    except BaseException:
        if trash is not None:
            store.restore(model_id, trash)
        raise
    if trash is not None:
        store.purge(trash)


@dataclass
class Reconciliation:
    records_without_files: list[str] = field(default_factory=list)
    orphan_directories: list[str] = field(default_factory=list)
    unshared_files: list[str] = field(default_factory=list)


def unshare(directory: Path) -> list[str]:
    """Give every file of a model directory that has other hard links (an import from before imports
    copied) its own copy, swapped in by one rename: the store then shares no data with anyone's files."""
    done = []
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink() or not entry.is_file() or entry.stat().st_nlink < 2:
            continue
        copy = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}.unshare")
        try:
            shutil.copy2(entry, copy)
            os.replace(copy, entry)
        except OSError:
            copy.unlink(missing_ok=True)
            raise
        done.append(entry.name)
    return done


def reconcile(store: ModelStore, registry: Registry, grace_s: float = ORPHAN_GRACE_S) -> Reconciliation:
    """Registry records whose directory is missing are moved to the registry's quarantine (restorable, out
    of the model list, their id free again); directories of the store no record names, older than
    `grace_s`, are moved to `<store>/.orphans/` (nothing is deleted); files of registered models that share
    their data with other names get their own copy (`unshare`). All of it is logged."""
    found = Reconciliation()
    registered = {record.id for record in registry.list()}
    for model_id in sorted(registered):
        if not store.path(model_id).is_dir() and registry.quarantine(model_id):
            found.records_without_files.append(model_id)
            log.warning("model %r is registered but its files are gone: record moved to quarantine", model_id)
        elif store.path(model_id).is_dir():
            try:
                names = unshare(store.path(model_id))
            except OSError as e:
                log.warning("model %r shares files with other names and cannot copy them: %s", model_id, e)
                continue
            found.unshared_files += [f"{model_id}/{name}" for name in names]
            if names:
                log.warning("model %r: %s had other hard links; each has its own copy now", model_id, names)
    now = time.time()
    for entry in sorted(store.root.iterdir()):
        if entry.name.startswith(".") or entry.name in registered or not entry.is_dir() or entry.is_symlink():
            continue
        st = entry.stat()
        if now - st.st_mtime < grace_s:
            continue
        target = store.root / ORPHANS / f"{entry.name}.{uuid.uuid4().hex[:8]}"
        try:
            target.parent.mkdir(exist_ok=True)
            entry.rename(target)
        except OSError as e:
            log.warning("store directory %r is not a registered model; cannot move it: %s", entry.name, e)
            continue
        found.orphan_directories.append(entry.name)
        log.warning("directory %r of the store is not a registered model: moved to %s", entry.name, target)
    return found


def reconcile_at_start(redis: Redis, models_dir: Path) -> Reconciliation | None:
    """`reconcile` for a starting service: a store or Redis that cannot be read is logged, not fatal."""
    try:
        return reconcile(ModelStore(models_dir), Registry(redis))
    except (OSError, RedisError) as e:
        log.warning("could not reconcile the registry with the store: %s", e)
        return None
