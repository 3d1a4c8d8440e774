"""/docs works offline: Swagger UI's script and style come from the API itself, never a CDN."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.app import create_app
from workers.settings import Settings


def test_docs_page_loads_swagger_ui_assets_from_the_server_itself(tmp_path, isolated_redis_url):
    settings = Settings(home=tmp_path / "home", redis_url=isolated_redis_url, default_model=False)
    with TestClient(create_app(settings)) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        assets = re.findall(r"""(?:src|href)=["']([^"']+\.(?:js|css))["']""", page.text)
        assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
        assert any(a.endswith(".css") for a in assets)
        for asset in assets:
            assert asset.startswith("/"), asset  # served here, not from https://cdn...
            r = c.get(asset)
            assert r.status_code == 200 and len(r.content) > 10_000
        assert "SwaggerUIBundle" in c.get(next(a for a in assets if a.endswith("bundle.js"))).text
        assert c.get("/openapi.json").json()["openapi"].startswith("3.")
