"""Malformed text and models that cannot be used: a short 4xx (or 424 for a model that cannot load), never
a 500 with whatever the library raised."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from service.app import create_app
from tests.tiny_models import CHAT_TEMPLATE, make_tiny_chat_llama, make_tiny_llama
from workers.settings import Settings
from workers.store.loadable import PROBE

JSON = {"Content-Type": "application/json"}
YAML = {"Content-Type": "application/yaml"}


def api(tmp_path, redis_url: str) -> TestClient:
    settings = Settings(
        home=tmp_path / "home",
        redis_url=redis_url,
        default_model=False,
        import_roots=[tmp_path],
        profile_on_register=False,
    )
    return TestClient(create_app(settings))


def short_4xx(r, status: int = 422, says: str = "") -> None:
    assert r.status_code == status, r.text
    assert len(r.content) < 1500 and "Traceback" not in r.text
    assert says in r.text, r.text


def post(c: TestClient, path: str, body: dict):
    """`body` as JSON, lone surrogates escaped as a client would send them (`\\ud800`)."""
    return c.post(path, content=json.dumps(body), headers=JSON)


BAD_NAMES = {  # case: (a name in the path, what the answer says)
    "nul": ("a\x00b", "NUL"),
    "long name": ("x" * 10_000, "at most"),
    "long path": ("/".join(["y" * 200] * 30), "at most"),
    "surrogate": ("\ud800", "Unicode"),
}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_unusable_paths_in_imports_and_merges_get_a_short_422(tmp_path, isolated_redis_url, case):
    make_tiny_llama(tmp_path / "base", seed=0)
    name, says = BAD_NAMES[case]
    path = f"{tmp_path}/{name}"
    merge = {"merge_method": "linear", "models": [{"model": path, "parameters": {"weight": 1}}]}
    with api(tmp_path, isolated_redis_url) as c:
        short_4xx(post(c, "/v1/models/import", {"id": "x", "path": path}), says=says)
        short_4xx(post(c, "/v1/merges", merge), says=says)
        recipe = f"merge_method: linear\nmodels: [{{model: {json.dumps(path)}, parameters: {{weight: 1}}}}]\n"
        for route in ("/v1/merges", "/v1/merges/validate"):
            short_4xx(c.post(route, content=recipe, headers=YAML), says=says)
        assert c.get("/v1/jobs").json()["data"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"model": "\ud800", "prompt": "hi"},
        {"model": "m", "prompt": "hi \udfff there"},
        {"model": "m", "prompt": "\ud83d"},  # half an emoji
        {"model": "m", "messages": [{"role": "user", "content": "a\udc00"}]},
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
    ],
)
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/chat/completions", "/v1/completions"])
def test_lone_surrogates_in_generation_requests_get_a_short_422(tmp_path, isolated_redis_url, body, path):
    make_tiny_chat_llama(tmp_path / "m")
    with api(tmp_path, isolated_redis_url) as c:
        assert c.post("/v1/models/import", json={"id": "m", "path": str(tmp_path / "m")}).status_code == 201
        short_4xx(post(c, path, body), says="not valid Unicode")
        # a pair is one character, and fine: the request gets as far as the missing inference worker
        fine = {"model": "m", "prompt": "\ud83d\ude00"}
        if path == "/v1/chat/completions":
            fine = {"model": "m", "messages": [{"role": "user", "content": "\ud83d\ude00"}]}
        assert post(c, path, fine).status_code == 503


@pytest.mark.parametrize("text", [42, None, ["a", "b"], {"x": 1}, True])
def test_chat_content_parts_whose_text_is_not_a_string_get_422(tmp_path, isolated_redis_url, text):
    make_tiny_chat_llama(tmp_path / "m")
    with api(tmp_path, isolated_redis_url) as c:
        assert c.post("/v1/models/import", json={"id": "m", "path": str(tmp_path / "m")}).status_code == 201
        for content in (
            [{"type": "text", "text": text}],
            [{"type": "text"}],
            [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],  # never silently dropped
            text,
        ):
            for path in ("/v1/chat/completions", "/v1/generate"):
                short_4xx(post(c, path, {"model": "m", "messages": [{"role": "user", "content": content}]}))


def test_a_tokenizer_that_raises_while_encoding_gets_422(tmp_path, isolated_redis_url):
    make_tiny_llama(tmp_path / "no-unk", vocab_size=128)
    # a-z and what the import's probe text needs (it must load, encode and decode to be registered), no
    # unknown token: any other capital letter raises while encoding
    alphabet = sorted(set(map(chr, range(97, 123))) | set(PROBE))
    backend = Tokenizer(models.WordLevel({ch: i for i, ch in enumerate(alphabet)}))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "no-unk")
    with api(tmp_path, isolated_redis_url) as c:
        r = c.post("/v1/models/import", json={"id": "no-unk", "path": str(tmp_path / "no-unk")})
        assert r.status_code == 201, r.text
        for path, body in [
            ("/v1/generate", {"model": "no-unk", "prompt": "ABC"}),
            ("/v1/completions", {"model": "no-unk", "prompt": "ABC"}),
            ("/v1/chat/completions", {"model": "no-unk", "messages": [{"role": "user", "content": "HI"}]}),
        ]:
            r = c.post(path, json=body)
            short_4xx(r)
            assert "tokenizer cannot encode" in r.json()["detail"]


def test_a_model_the_inference_worker_cannot_load_gets_a_one_line_424(server):
    path = server.home.parent / "unloadable"
    make_tiny_chat_llama(path)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "unloadable", "path": str(path)}).status_code == 201
        stored = server.home / "models" / "unloadable" / "model.safetensors"
        stored.unlink()  # a new inode: the import's source stays intact
        stored.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
        r = c.post("/v1/generate", json={"model": "unloadable", "prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 424, r.text
        detail = r.json()["detail"]
        assert "cannot be loaded" in detail and "\n" not in detail and str(server.home) not in detail
        streamed = c.post(
            "/v1/completions", json={"model": "unloadable", "prompt": "hi", "max_tokens": 2, "stream": True}
        )
        events = [e.removeprefix("data: ") for e in streamed.text.split("\n\n") if e]
        assert events[-1] == "[DONE]" and "cannot be loaded" in json.loads(events[-2])["error"]["message"]
        c.delete("/v1/models/unloadable")
