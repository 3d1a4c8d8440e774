"""Every file a model references resolves inside the model directory, every safetensors header is checked
against its file, config.json must be an object, and a key file that is not there stops the server."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.tiny_models import make_tiny_llama
from workers.inference.worker import load_engine
from workers.jobs.models import load_model
from workers.settings import Settings
from workers.tensors.safetensors_io import SafetensorsError

SECRET = b"TOPSECRETDATA-0123456789"


def api(tmp_path, redis_url: str) -> TestClient:
    settings = Settings(
        home=tmp_path / "home", redis_url=redis_url, default_model=False, import_roots=[tmp_path / "roots"]
    )
    return TestClient(create_app(settings))


def write_safetensors(path, header: object, data: bytes = b"", length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def model_dir(root, name: str = "m"):
    """A real tiny model's config and tokenizer-free directory, weights left to the test."""
    path = root / "roots" / name
    make_tiny_llama(path)
    return path


def secret_outside(tmp_path):
    """A readable file outside the import roots: a valid safetensors whose data is a secret."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret.safetensors"
    write_safetensors(
        secret, {"w": {"dtype": "U8", "shape": [len(SECRET)], "data_offsets": [0, len(SECRET)]}}, SECRET
    )
    return secret


def assert_clean_422(response, *needles: str) -> None:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and len(detail) < 500
    assert "SECRET" not in detail and ".staging" not in detail
    for needle in needles:
        assert needle in detail, detail


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_index_weight_map_entries_outside_the_model_directory_are_refused(
    tmp_path, isolated_redis_url, where
):
    secret = secret_outside(tmp_path)
    path = model_dir(tmp_path)
    os.remove(path / "model.safetensors")
    write_safetensors(path / "model-00001-of-00001.safetensors", {})
    target = os.path.relpath(secret, path) if where == "relative" else str(secret)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target}}))
    with api(tmp_path, isolated_redis_url) as c:
        r = c.post("/v1/models/import", json={"id": "escape", "path": str(path)})
        assert_clean_422(r, "outside the model directory")
        assert c.get("/v1/models/escape").status_code == 404
        merge = {"merge_method": "linear", "models": [{"model": str(path), "parameters": {"weight": 1.0}}]}
        assert_clean_422(c.post("/v1/merges", json=merge), "outside the model directory")


def test_shards_and_files_that_are_symlinks_out_of_the_model_directory_are_refused(
    tmp_path, isolated_redis_url
):
    secret = secret_outside(tmp_path)
    path = model_dir(tmp_path)
    os.remove(path / "model.safetensors")
    os.symlink(secret, path / "model.safetensors")
    with api(tmp_path, isolated_redis_url) as c:
        merge = {"merge_method": "linear", "models": [{"model": str(path), "parameters": {"weight": 1.0}}]}
        assert_clean_422(c.post("/v1/merges", json=merge), "outside the model directory")
        # a tokenizer file linked out of the directory is refused too (it would be copied into the store)
        os.remove(path / "model.safetensors")
        make_tiny_llama(tmp_path / "roots" / "fresh")
        shutil.copyfile(tmp_path / "roots" / "fresh" / "model.safetensors", path / "model.safetensors")
        os.symlink(secret, path / "tokenizer.json")
        assert_clean_422(c.post("/v1/merges", json=merge), "outside the model directory")


def test_a_bad_header_length_is_not_echoed(tmp_path, isolated_redis_url):
    path = model_dir(tmp_path)
    (path / "model.safetensors").write_bytes(SECRET * 4)  # the first 8 bytes read as a header length
    leaked = str(struct.unpack("<Q", SECRET[:8])[0])
    with api(tmp_path, isolated_redis_url) as c:
        r = c.post("/v1/models/import", json={"id": "liar", "path": str(path)})
    assert_clean_422(r, "model.safetensors")
    assert leaked not in r.json()["detail"]


F32_16 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
LIES = {
    "length beyond the file": ({"w": F32_16}, 10**6, "header length"),
    "offsets past the end": ({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, None, "'w'"),
    "reversed offsets": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, None, "'w'"),
    "negative shape": ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, None, "'w'"),
    "absurd shape": ({"w": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 16]}}, None, "'w'"),
    "shape not matching the bytes": (
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}},
        None,
        "'w'",
    ),
    "unknown dtype": ({"w": {"dtype": "F8_E9M0", "shape": [4], "data_offsets": [0, 16]}}, None, "'w'"),
    "empty dtype": ({"w": {"dtype": "", "shape": [4], "data_offsets": [0, 16]}}, None, "'w'"),
    "header is a list": ([F32_16], None, "not a JSON object"),
    "overlapping tensors": (
        {"w": F32_16, "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
        None,
        "overlaps",
    ),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_lying_safetensors_headers_are_refused_at_import_naming_the_tensor(tmp_path, isolated_redis_url, lie):
    header, length, needle = LIES[lie]
    path = model_dir(tmp_path)
    write_safetensors(path / "model.safetensors", header, b"\0" * 16, length)
    with api(tmp_path, isolated_redis_url) as c:
        r = c.post("/v1/models/import", json={"id": "liar", "path": str(path)})
        assert_clean_422(r, needle)
        assert c.get("/v1/models").json()["data"] == []  # nothing registered, no num_parameters -64


def test_lying_headers_are_refused_before_a_job_reads_the_model(tmp_path, isolated_redis_url):
    path = model_dir(tmp_path)
    with api(tmp_path, isolated_redis_url) as c:
        assert c.post("/v1/models/import", json={"id": "good", "path": str(path)}).status_code == 201
        stored = tmp_path / "home" / "models" / "good" / "model.safetensors"
        write_safetensors(stored, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4)
        r = c.post("/v1/jobs", json={"kind": "truncate", "model": "good", "num_layers": 2})
        # the file is not the one registered: refused, naming it, before its header is even read
        assert r.status_code == 409 and "model.safetensors" in r.json()["detail"], r.text
    for load in (load_model, load_engine):  # what prune, grow, sort, profile and inference call first
        with pytest.raises(SafetensorsError, match="tensor 'w'"):
            load(stored.parent)


@pytest.mark.parametrize(
    "config", ["[1, 2, 3]", "42", '"text"', "{not json", '{"num_hidden_layers": "four"}', "[" * 100_000]
)
def test_config_json_that_is_not_a_sane_object_gets_422(tmp_path, isolated_redis_url, config):
    path = model_dir(tmp_path)
    (path / "config.json").write_text(config)
    with api(tmp_path, isolated_redis_url) as c:
        assert_clean_422(c.post("/v1/models/import", json={"id": "cfg", "path": str(path)}), "config.json")
        merge = {"merge_method": "linear", "models": [{"model": str(path), "parameters": {"weight": 1.0}}]}
        assert_clean_422(c.post("/v1/merges", json=merge), "config.json")


@pytest.mark.parametrize("keys", ["/no/such/strata-keys", "~/no-such-strata-keys", "EMPTY"])
def test_api_keys_naming_a_missing_or_empty_file_stop_the_server(tmp_path, keys):
    if keys == "EMPTY":
        keys = str(tmp_path / "keys")
        (tmp_path / "keys").write_text("# nobody yet\n")
    env = {**os.environ, "STRATA_HOME": str(tmp_path / "home"), "STRATA_API_KEYS": keys}
    env["STRATA_DEFAULT_MODEL"] = "false"
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--workers", "0", "--infer-workers", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "STRATA_API_KEYS" in done.stderr and "Traceback" not in done.stderr
