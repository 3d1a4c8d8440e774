"""A model's chat template is someone else's code: it renders off the API's event loop, within a time and
an output limit, and is checked when it is registered (import, a merge's chat_template)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.test_bad_requests import api
from tests.tiny_models import make_tiny_chat_llama, make_tiny_llama, make_variant

LOOPS = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
SLOW = LOOPS + "{{ messages[0].content }}"  # seconds in Jinja: 10^8 empty iterations
HUGE = "{{ 'ab' * 3000000 }}{{ messages[0].content }}"
ENDLESS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def set_template(directory, template: str, where: str = "chat_template.jinja") -> None:
    """The template, in chat_template.jinja (as transformers saves it) or tokenizer_config.json."""
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    if where == "chat_template.jinja":
        (directory / where).write_text(template)
        return
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("template", "where"),
    [
        (ENDLESS, "chat_template.jinja"),
        (ENDLESS, "tokenizer_config.json"),
        (HUGE, "chat_template.jinja"),
        ("{{ 'ab' * 10000000000 }}", "chat_template.jinja"),
        ("{% for %}", "tokenizer_config.json"),
    ],
)
def test_an_import_whose_chat_template_is_unusable_gets_422(tmp_path, isolated_redis_url, template, where):
    make_tiny_chat_llama(tmp_path / "m")
    set_template(tmp_path / "m", template, where)
    with api(tmp_path, isolated_redis_url) as c:
        start = time.monotonic()
        r = c.post("/v1/models/import", json={"id": "m", "path": str(tmp_path / "m")})
        assert r.status_code == 422 and "chat template is unusable" in r.json()["detail"], r.text
        assert time.monotonic() - start < 30  # the sandbox's start plus its 2 s deadline
        assert c.get("/v1/models/m").status_code == 404


def test_a_template_that_refuses_the_sample_conversation_still_imports(tmp_path, isolated_redis_url):
    make_tiny_chat_llama(tmp_path / "m")
    strict = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    set_template(tmp_path / "m", strict + "{% for m in messages %}{{ m.content }}{% endfor %}")
    with api(tmp_path, isolated_redis_url) as c:
        assert c.post("/v1/models/import", json={"id": "m", "path": str(tmp_path / "m")}).status_code == 201
        r = c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "system", "content": "x"}]})
        assert r.status_code == 422 and "no system role" in r.json()["detail"]
        assert c.get("/v1/models/m").json()["strata"]["chat_template_error"] is None  # its own refusal


@pytest.mark.parametrize(("template", "says"), [(SLOW, "longer than"), (HUGE, "more than")])
def test_a_stored_template_past_the_limits_gets_422_keeps_health_answered_and_is_recorded(
    tmp_path, isolated_redis_url, template, says
):
    """A model registered before its template was checked (or from a directory merged by path)."""
    make_tiny_chat_llama(tmp_path / "m")
    with api(tmp_path, isolated_redis_url) as c:
        assert c.post("/v1/models/import", json={"id": "m", "path": str(tmp_path / "m")}).status_code == 201
        set_template(tmp_path / "home" / "models" / "m", template)
        # the tokenizer is loaded and the prompt short: what used to be encoded on the event loop
        assert c.post("/v1/generate", json={"model": "m", "prompt": "hi"}).status_code == 503
        replies = []
        chat = threading.Thread(target=lambda: replies.append(c.post("/v1/chat/completions", json=CHAT)))
        start = time.monotonic()
        chat.start()
        slowest = 0.0
        while chat.is_alive():
            asked = time.monotonic()
            assert c.get("/health").status_code in (200, 503)
            slowest = max(slowest, time.monotonic() - asked)
            time.sleep(0.05)
        took = time.monotonic() - start
        (r,) = replies
        assert r.status_code == 422, r.text
        assert "chat template is unusable" in r.json()["detail"] and says in r.json()["detail"]
        assert took < 8 and slowest < 1.5, (took, slowest)
        assert says in c.get("/v1/models/m").json()["strata"]["chat_template_error"]
        start = time.monotonic()  # known unusable: refused without rendering it again
        r = c.post("/v1/generate", json={"model": "m", "messages": CHAT["messages"]})
        assert r.status_code == 422 and "unusable" in r.json()["detail"] and time.monotonic() - start < 1
        assert c.post("/v1/generate", json={"model": "m", "prompt": "hi"}).status_code == 503  # prompts work


def test_a_merge_naming_an_unusable_chat_template_gets_422_before_queueing(tmp_path, isolated_redis_url):
    make_tiny_llama(tmp_path / "base", seed=0)
    make_variant(tmp_path / "base", tmp_path / "a", seed=1)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}}],
        "chat_template": ENDLESS,
    }
    with api(tmp_path, isolated_redis_url) as c:
        r = c.post("/v1/merges", json=recipe)
        assert r.status_code == 422 and "chat template is unusable" in r.json()["detail"], r.text
        assert c.get("/v1/jobs").json()["data"] == []
        fine = {**recipe, "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
        assert c.post("/v1/merges", json=fine).status_code == 202


def test_a_merge_taking_an_unusable_template_from_a_directory_fails_and_registers_nothing(server):
    """Models given by path were never imported: the template the merged model would carry is checked."""
    root = server.home.parent
    make_tiny_chat_llama(root / "hostile-base", seed=0)
    set_template(root / "hostile-base", ENDLESS)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(root / "hostile-base"), "parameters": {"weight": 1.0}}],
        "name": "hostile-merge",
    }
    with server.client() as c:
        job = c.post("/v1/merges", json=recipe)
        assert job.status_code == 202, job.text
        final = server.wait_job(job.json()["id"])
        assert final["status"] == "failed" and "chat template is unusable" in final["error"], final
        assert "\n" not in final["error"]
        assert c.get("/v1/models/hostile-merge").status_code == 404
