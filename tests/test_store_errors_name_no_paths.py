"""When the store refuses a change the answer gives the real cause (not "already exists") and never shows
where the store lives; a failed job's reason is one line without paths."""

from __future__ import annotations

import errno
import os

from tests.local_api import local_api
from tests.tiny_models import make_tiny_llama
from workers.jobs.errors import one_line_reason
from workers.store import model_store


def assert_no_path(detail: str, tmp_path) -> None:
    assert str(tmp_path / "home") not in detail and ".staging" not in detail, detail


def test_a_store_that_refuses_the_rename_says_why_not_already_exists(
    tmp_path, isolated_redis_url, monkeypatch
):
    path = tmp_path / "roots" / "m"
    make_tiny_llama(path)
    with local_api(tmp_path, isolated_redis_url) as c:

        def refuse(source, target):
            raise PermissionError(errno.EACCES, "Permission denied", str(source), None, str(target))

        monkeypatch.setattr(model_store.os, "rename", refuse)
        r = c.post("/v1/models/import", json={"id": "m", "path": str(path)})
        monkeypatch.undo()
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert "Permission denied" in detail and "already exists" not in detail
        assert_no_path(detail, tmp_path)
        assert c.post("/v1/models/import", json={"id": "m", "path": str(path)}).status_code == 201


def test_a_broken_staging_directory_is_a_503_without_paths(tmp_path, isolated_redis_url):
    path = tmp_path / "roots" / "m"
    make_tiny_llama(path)
    with local_api(tmp_path, isolated_redis_url) as c:
        staging = tmp_path / "home" / "models" / ".staging"
        os.rmdir(staging)
        staging.write_text("not a directory")
        r = c.post("/v1/models/import", json={"id": "m", "path": str(path)})
        assert r.status_code == 503, r.text
        assert "staging directory" in r.json()["detail"]
        assert str(tmp_path / "home") not in r.json()["detail"]


def test_the_507_for_a_full_disk_shows_no_path(tmp_path, isolated_redis_url):
    path = tmp_path / "roots" / "m"
    make_tiny_llama(path)
    with local_api(tmp_path, isolated_redis_url, min_free_bytes=1 << 60) as c:
        assert c.post("/v1/models/import", json={"id": "m", "path": str(path)}).status_code == 201
        r = c.post("/v1/jobs", json={"kind": "grow", "model": "m", "insert_after": [0]})
        assert r.status_code == 507, r.text
        assert "STRATA_MIN_FREE_BYTES" in r.json()["detail"]
        assert_no_path(r.json()["detail"], tmp_path)


def test_a_failed_jobs_reason_is_one_line_without_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("STRATA_HOME", str(tmp_path / "home"))
    staging = tmp_path / "home" / "models" / ".staging" / "x.host.1.abcd"
    reason = one_line_reason(PermissionError(errno.EACCES, "Permission denied", str(staging)))
    assert reason == "PermissionError: Permission denied"
    reason = one_line_reason(ValueError(f"cannot read {tmp_path / 'home' / 'models' / 'm'}\n  at line 3\n"))
    assert reason == "ValueError: cannot read $STRATA_HOME/models/m; at line 3"
