"""Deleting and publishing leave the old state or the new one when they fail partway, and a starting
service reconciles the registry with the store (orphans reported and moved aside, never lost)."""

from __future__ import annotations

import errno
import logging
import os
import time

from fastapi.testclient import TestClient
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.local_api import local_api
from tests.tiny_models import make_tiny_llama
from workers.store import model_store
from workers.store.registry import Registry


def imported(c: TestClient, tmp_path, model_id: str = "m") -> None:
    path = tmp_path / "roots" / model_id
    if not path.exists():
        make_tiny_llama(path)
    r = c.post("/v1/models/import", json={"id": model_id, "path": str(path)})
    assert r.status_code == 201, r.text


def test_a_delete_that_fails_partway_changes_nothing_and_can_be_retried(
    tmp_path, isolated_redis_url, monkeypatch
):
    stored = tmp_path / "home" / "models" / "m"
    with local_api(tmp_path, isolated_redis_url) as c:
        imported(c, tmp_path)

        def refuse(*_):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(model_store.os, "rename", refuse)  # the model's directory is unwritable
        r = c.delete("/v1/models/m")
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert "Permission denied" in detail and "nothing changed" in detail and str(tmp_path) not in detail
        assert c.get("/v1/models/m").status_code == 200 and (stored / "model.safetensors").is_file()
        monkeypatch.undo()

        def redis_gone(*_):
            raise RedisConnectionError("Connection refused")

        monkeypatch.setattr(Registry, "remove", redis_gone)  # moved aside, then unregistering fails
        assert c.delete("/v1/models/m").status_code == 503
        assert (stored / "model.safetensors").is_file()  # registered and with its files, as before
        monkeypatch.undo()
        r = c.post("/v1/jobs", json={"kind": "truncate", "model": "m", "num_layers": 2})
        assert r.status_code == 202, r.text
        assert c.delete("/v1/models/m").status_code == 200
        assert not stored.exists()
        imported(c, tmp_path)  # the id is free again


def test_an_import_whose_register_fails_leaves_no_directory(tmp_path, isolated_redis_url, monkeypatch):
    with local_api(tmp_path, isolated_redis_url) as c:

        def redis_gone(*_, **__):
            raise RedisConnectionError("Connection refused")

        monkeypatch.setattr(Registry, "add", redis_gone)
        path = tmp_path / "roots" / "m"
        make_tiny_llama(path)
        assert c.post("/v1/models/import", json={"id": "m", "path": str(path)}).status_code == 503
        assert not (tmp_path / "home" / "models" / "m").exists()
        monkeypatch.undo()
        imported(c, tmp_path)  # not "already exists in the store"


def test_startup_moves_orphans_aside_and_quarantines_records_without_files(
    tmp_path, isolated_redis_url, caplog
):
    models = tmp_path / "home" / "models"
    with local_api(tmp_path, isolated_redis_url) as c:
        imported(c, tmp_path, "kept")
        imported(c, tmp_path, "lost")
        imported(c, tmp_path, "orphan")
    redis = Redis.from_url(isolated_redis_url)
    Registry(redis).remove("orphan")  # a crash between unregistering and removing the files
    os.rename(models / "lost", tmp_path / "elsewhere")  # files gone behind the registry's back
    (models / "fresh").mkdir()  # a publish between its rename and its register: left alone
    old = time.time() - 3600
    os.utime(models / "orphan", (old, old))
    with caplog.at_level(logging.WARNING, logger="strata"), local_api(tmp_path, isolated_redis_url) as c:
        ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert ids == {"kept"}
        assert not (models / "orphan").exists() and (models / "fresh").is_dir()
        moved = os.listdir(models / ".orphans")
        assert len(moved) == 1 and moved[0].startswith("orphan.")
        assert redis.hexists("strata:models:quarantine", "lost")
        imported(c, tmp_path, "orphan")  # both ids are usable again
        imported(c, tmp_path, "lost")
    logged = caplog.text
    assert "'lost'" in logged and "'orphan'" in logged


def test_startup_gives_store_files_shared_with_an_import_root_their_own_copy(tmp_path, isolated_redis_url):
    source = tmp_path / "roots" / "m" / "model.safetensors"
    stored = tmp_path / "home" / "models" / "m" / "model.safetensors"
    with local_api(tmp_path, isolated_redis_url) as c:
        imported(c, tmp_path)
    stored.unlink()
    os.link(source, stored)  # as imports before this version left them: one inode, two directories
    with local_api(tmp_path, isolated_redis_url) as c:
        assert os.stat(stored).st_nlink == 1 and os.stat(stored).st_ino != os.stat(source).st_ino
        assert stored.read_bytes() == source.read_bytes()
        r = c.post("/v1/jobs", json={"kind": "truncate", "model": "m", "num_layers": 2})
        assert r.status_code == 202, r.text
