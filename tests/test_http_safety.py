"""HTTP-level safety of every response and request: framing, duplicated credentials, cross-site requests."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
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
