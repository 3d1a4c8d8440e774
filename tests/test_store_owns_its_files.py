"""The store shares no file with a user's directory: a hard link in an import root is refused (it could
name a secret outside the root), imports copy, and a model whose files changed since it was registered is
refused with a short reason naming it, by jobs (409) and by generation (424), never served or a 500."""

from __future__ import annotations

import os
from pathlib import Path

from tests.local_api import local_api
from tests.tiny_models import make_tiny_chat_llama, make_tiny_llama

SECRET = b"TOPSECRETDATA-0123456789"


def test_a_file_hard_linked_out_of_an_import_root_is_refused(tmp_path, isolated_redis_url):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    path = tmp_path / "roots" / "m"
    make_tiny_llama(path)
    os.link(outside / "secret.txt", path / "tokenizer.json")
    with local_api(tmp_path, isolated_redis_url) as c:
        r = c.post("/v1/models/import", json={"id": "linked", "path": str(path)})
        assert r.status_code == 422 and "hard link" in r.json()["detail"], r.text
        assert "SECRET" not in r.text
        assert c.get("/v1/models/linked/files/tokenizer.json").status_code == 404
        merge = {"merge_method": "linear", "models": [{"model": str(path), "parameters": {"weight": 1.0}}]}
        r = c.post("/v1/merges", json=merge)
        assert r.status_code == 422 and "hard link" in r.json()["detail"], r.text
        # the weights themselves hard-linked: refused the same way
        os.remove(path / "tokenizer.json")
        os.link(path / "model.safetensors", outside / "copy.safetensors")
        r = c.post("/v1/models/import", json={"id": "linked", "path": str(path)})
        assert r.status_code == 422 and "model.safetensors" in r.json()["detail"], r.text
        # a job's data file hard-linked to the secret: refused too
        make_tiny_llama(tmp_path / "roots" / "sound")
        sound = {"id": "sound", "path": str(tmp_path / "roots" / "sound")}
        assert c.post("/v1/models/import", json=sound).status_code == 201
        os.link(outside / "secret.txt", tmp_path / "roots" / "data.jsonl")
        body = {"kind": "fit_exits", "model": "sound", "data": str(tmp_path / "roots" / "data.jsonl")}
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 422 and "hard link" in r.json()["detail"], r.text


def import_tiny(c, tmp_path) -> tuple[Path, Path]:
    """A tiny model imported as 'm': its source directory and its directory in the store."""
    path = tmp_path / "roots" / "m"
    make_tiny_llama(path)
    assert c.post("/v1/models/import", json={"id": "m", "path": str(path)}).status_code == 201
    return path, tmp_path / "home" / "models" / "m"


def test_imports_copy_so_rewriting_the_source_leaves_the_model_intact(tmp_path, isolated_redis_url):
    with local_api(tmp_path, isolated_redis_url) as c:
        path, stored = import_tiny(c, tmp_path)
        for name in os.listdir(path):
            source, copy = os.stat(path / name), os.stat(stored / name)
            assert copy.st_ino != source.st_ino and copy.st_nlink == 1 and source.st_nlink == 1
        _damage(path / "model.safetensors")  # the user rewrites the source in place
        r = c.post("/v1/jobs", json={"kind": "truncate", "model": "m", "num_layers": 2})
        assert r.status_code == 202, r.text
        files = c.get("/v1/models/m").json()["strata"]["files"]
        assert set(files) == {"config.json", "model.safetensors"}
        assert files["model.safetensors"]["size"] == os.path.getsize(stored / "model.safetensors")


def _damage(file) -> None:
    """Rewrite the file's last bytes in place, keeping its size."""
    with open(file, "r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(b"\x7f" * 16)


def test_a_model_whose_files_changed_is_refused_by_jobs_with_409(tmp_path, isolated_redis_url):
    with local_api(tmp_path, isolated_redis_url) as c:
        _, stored = import_tiny(c, tmp_path)
        _damage(stored / "model.safetensors")
        r = c.post("/v1/jobs", json={"kind": "truncate", "model": "m", "num_layers": 2})
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert "'m'" in detail and "model.safetensors" in detail and str(tmp_path) not in detail
        for body in ({"kind": "profile", "model": "m"}, {"kind": "fit_exits", "model": "m"}):
            r = c.post("/v1/jobs", json=body)  # jobs that read the record, not a reference
            assert r.status_code == 409 and "changed on disk" in r.json()["detail"], r.text
        (stored / "config.json").unlink()
        r = c.post("/v1/jobs", json={"kind": "truncate", "model": "m", "num_layers": 2})
        assert r.status_code == 409 and "config.json" in r.json()["detail"], r.text


def test_generating_with_a_model_whose_files_changed_is_a_424_naming_it(server):
    path = server.home.parent / "tampered"
    make_tiny_chat_llama(path, seed=3)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "tampered", "path": str(path)}).status_code == 201
        _damage(server.home / "models" / "tampered" / "model.safetensors")
        r = c.post("/v1/generate", json={"model": "tampered", "prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 424, r.text
        detail = r.json()["detail"]
        assert "'tampered'" in detail and "changed on disk" in detail and "\n" not in detail
