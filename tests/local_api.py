"""An in-process API (no workers) on its own Redis, with a private home and `<tmp>/roots` as import root."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from workers.settings import Settings


def local_api(tmp_path: Path, redis_url: str, **overrides) -> TestClient:
    settings = Settings(
        home=tmp_path / "home",
        redis_url=redis_url,
        default_model=False,
        import_roots=[tmp_path / "roots"],
        **overrides,
    )
    return TestClient(create_app(settings))
