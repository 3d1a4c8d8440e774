"""HTTP-level safety of every response and request: framing, duplicated credentials, cross-site requests."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.tiny_models import make_tiny_llama, make_variant
from workers.settings import Settings


def client(tmp_path, redis_url: str, **settings) -> TestClient:
    values = dict(home=tmp_path / "home", redis_url=redis_url, default_model=False, import_roots=[tmp_path])
    return TestClient(create_app(Settings(**{**values, **settings})))


def test_no_page_or_response_can_be_framed(tmp_path, isolated_redis_url):
    with client(tmp_path, isolated_redis_url, api_keys="secret") as c:
        auth = {"Authorization": "Bearer secret"}
        responses = [
            c.get("/docs", headers=auth),
            c.get("/redoc", headers=auth),
            c.get("/openapi.json", headers=auth),
            c.get("/v1/models", headers=auth),
            c.get("/v1/models"),  # 401 from the key check
            c.get("/health"),
            c.get("/v1/models/nope", headers=auth),  # 404
            c.get("/"),
        ]
    for r in responses:
        assert r.headers["x-frame-options"] == "DENY", r.request.url
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], r.request.url
    assert "default-src 'self'" in responses[-1].headers["content-security-policy"]  # the console's own


def test_two_authorization_headers_are_refused(tmp_path, isolated_redis_url):
    twice = [("Authorization", "Bearer wrong"), ("Authorization", "Bearer secret")]
    with client(tmp_path, isolated_redis_url, api_keys="secret") as c:
        assert c.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200
        for order in (twice, twice[::-1]):
            r = c.get("/v1/models", headers=order)
            assert r.status_code == 400 and "one Authorization header" in r.json()["detail"]
    with client(tmp_path, isolated_redis_url) as c:
        assert c.get("/v1/models", headers=twice).status_code == 400


def merge_yaml(root) -> str:
    return (
        f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\n"
        f"models:\n  - model: {root / 'a'}\n    parameters: {{weight: 0.5}}\n"
    )


@pytest.fixture
def family(tmp_path):
    make_tiny_llama(tmp_path / "base", seed=0)
    make_variant(tmp_path / "base", tmp_path / "a", seed=1)
    return tmp_path


# What a page of another site can send without a CORS preflight: no content type (a Blob body with
# mode 'no-cors'), text/plain, a form post, a multipart upload; and what it could send after one.
CROSS_SITE_TYPES = [
    None,
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
]
CROSS_SITE_MARKS = [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},  # a sandboxed frame or a no-referrer page
    {"Origin": "http://testserver.evil.example"},
    {"Origin": "http://testserver:8080"},  # another port is another origin
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Referer": "http://evil.example/page"},
]


def test_cross_site_browser_requests_cannot_change_state_without_keys(tmp_path, isolated_redis_url, family):
    with client(tmp_path, isolated_redis_url) as c:
        for marks in CROSS_SITE_MARKS:
            for content_type in [*CROSS_SITE_TYPES, "application/json", "application/yaml"]:
                headers = {**marks, **({"Content-Type": content_type} if content_type else {})}
                r = c.post("/v1/merges", content=merge_yaml(family), headers=headers)
                assert r.status_code == 403, (marks, content_type, r.status_code)
                assert "cross-site" in r.json()["detail"]
            job = {"kind": "profile", "model": "m"}
            assert c.post("/v1/jobs", json=job, headers=marks).status_code == 403
            assert c.delete("/v1/models/m", headers=marks).status_code == 403
            assert c.delete("/v1/jobs/j", headers=marks).status_code == 403
        assert c.get("/v1/jobs").json()["data"] == []  # nothing was queued
        # reading stays open to everyone (a browser shows another site none of it without CORS)
        assert c.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200


def test_the_console_and_curl_still_change_state(tmp_path, isolated_redis_url, family):
    with client(tmp_path, isolated_redis_url, max_active_jobs_per_kind=100) as c:
        same_origin = [
            {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},  # the console's fetch
            {"Origin": "http://testserver:80"},
            {"Sec-Fetch-Site": "none"},  # typed by the user
            {"Referer": "http://testserver/"},
            {},  # curl, the OpenAI client
        ]
        for marks in same_origin:
            for content_type in ("application/yaml", "application/json", None):
                headers = {**marks, **({"Content-Type": content_type} if content_type else {})}
                r = c.post("/v1/merges", content=merge_yaml(family), headers=headers)
                assert r.status_code == 202, (marks, content_type, r.text)
        assert c.delete(f"/v1/jobs/{r.json()['id']}").status_code == 200
    with client(tmp_path, isolated_redis_url, api_keys="secret") as c:  # a key is proof enough
        headers = {"Authorization": "Bearer secret", "Origin": "http://elsewhere.example"}
        r = c.post(
            "/v1/merges", content=merge_yaml(family), headers={**headers, "Content-Type": "application/yaml"}
        )
        assert r.status_code == 202, r.text


def test_a_rebound_domain_cannot_reach_the_served_api(tmp_path, isolated_redis_url):
    settings = Settings(home=tmp_path / "home", redis_url=isolated_redis_url, default_model=False)
    for base, allowed in [
        ("http://127.0.0.1:8000", True),
        ("http://localhost:8000", True),
        ("http://[::1]:8000", True),
        ("http://10.1.2.3:8000", True),  # an address is never a rebound name
        ("http://evil.example:8000", False),
        ("http://evil.example", False),
        ("http://127.0.0.1.evil.example:8000", False),
    ]:
        with TestClient(create_app(settings, bound=True), base_url=base) as c:
            for r in (
                c.get("/v1/models"),
                c.get("/"),
                c.post("/v1/jobs", json={"kind": "profile", "model": "m"}),
            ):
                assert (r.status_code != 400) == allowed, (base, r.status_code)
                if not allowed:
                    assert "STRATA_ALLOWED_HOSTS" in r.json()["detail"]
    listed = settings.model_copy(update={"allowed_hosts": ["strata.lan"]})
    with TestClient(create_app(listed, bound=True), base_url="http://strata.lan:8000") as c:
        assert c.get("/v1/models").status_code == 200
        assert c.delete("/v1/jobs/j", headers={"Origin": "https://strata.lan"}).status_code == 404
    with TestClient(
        create_app(settings.model_copy(update={"api_keys": "k"}), bound=True), base_url="http://evil.example"
    ) as c:
        assert c.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200  # keys guard it


def test_allowed_hosts_come_comma_separated_from_the_environment(monkeypatch):
    monkeypatch.setenv("STRATA_ALLOWED_HOSTS", "strata.lan, gpu-box ")
    assert Settings().allowed_hosts == ["strata.lan", "gpu-box"]
