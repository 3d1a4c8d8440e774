"""Following jobs as server-sent events, dry-running merges, and the console's open page under API keys."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from workers.settings import Settings

RECIPE = """
merge_method: ties
base_model: ev-base
models:
  - model: ev-a
    parameters: {weight: 0.6, density: 0.5}
  - model: ev-b
    parameters: {weight: 0.4, density: [0.3, 0.9]}
dtype: float32
name: ev-ties
"""
YAML = {"Content-Type": "application/yaml"}


@pytest.fixture(scope="module")
def family(server, tiny_family):
    with server.client() as c:
        for name, path in tiny_family.items():
            r = c.post("/v1/models/import", json={"id": f"ev-{name}", "path": str(path)})
            assert r.status_code == 201, r.text


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, kind = [], "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
            kind = "message"
    return events


def test_job_events_stream_the_job_until_it_finishes(server, family):
    with server.client() as c:
        job = c.post("/v1/merges", content=RECIPE.replace("ev-ties", "ev-followed"), headers=YAML).json()
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = read_events(r)  # returns only because the server ends the stream
        polled = c.get(f"/v1/jobs/{job['id']}").json()
    assert events and all(kind == "job" for kind, _ in events)
    views = [view for _, view in events]
    assert all(view["id"] == job["id"] for view in views)
    assert views[-1]["status"] == "finished" and views[-1]["progress"] == 1.0
    assert views[-1]["result"]["model"] == "ev-followed" == polled["result"]["model"]
    assert all(view["status"] != "finished" for view in views[:-1])
    progress = [view["progress"] for view in views]
    assert progress == sorted(progress)
    states = [(v["status"], v["progress"], v["message"]) for v in views]
    assert len(set(states)) == len(states), "an event is sent only when something changed"


def test_job_events_of_an_ended_job_send_its_final_view_and_close(server, family):
    with server.client() as c:
        job = c.post("/v1/merges", content=RECIPE.replace("ev-ties", "ev-ended"), headers=YAML).json()
        final = server.wait_job(job["id"])
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            events = read_events(r)
    assert [view["status"] for _, view in events] == ["finished"]
    assert events[0][1]["result"] == final["result"]


def test_job_events_of_an_unknown_job_are_a_404(server):
    with server.client() as c:
        r = c.get("/v1/jobs/no-such-job/events")
    assert r.status_code == 404 and "not found" in r.json()["detail"]


def test_merge_validate_resolves_every_tensor_and_queues_nothing(server, family):
    with server.client() as c:
        before = [j["id"] for j in c.get("/v1/jobs").json()["data"]]
        r = c.post("/v1/merges/validate", content=RECIPE, headers=YAML)
        after = [j["id"] for j in c.get("/v1/jobs").json()["data"]]
        registered = c.get("/v1/models/ev-ties")
    assert r.status_code == 200, r.text
    assert before == after and registered.status_code == 404
    plan = r.json()
    assert plan["valid"] is True and plan["merge_method"] == "ties" and plan["name"] == "ev-ties"
    assert plan["input_models"] == ["ev-base", "ev-a", "ev-b"] and plan["reference_model"] == "ev-base"
    tensors = {t["name"]: t for t in plan["tensors"]}
    assert plan["num_tensors"] == len(tensors) == 4 * 9 + 3  # 4 layers of 9 tensors, embeddings, norm, head

    def density(name: str, model: str) -> float:
        return next(m["parameters"]["density"] for m in tensors[name]["models"] if m["model"] == model)

    # density [0.3, 0.9] is a gradient over the 4 layers: t = i / 3, value 0.3 + 0.6 t; t = 0 outside layers
    for layer in range(4):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        assert tensors[name]["layer_position"] == pytest.approx(layer / 3)
        assert density(name, "ev-b") == pytest.approx(0.3 + 0.6 * layer / 3)
        assert density(name, "ev-a") == 0.5
    assert density("model.embed_tokens.weight", "ev-b") == pytest.approx(0.3)
    head = tensors["lm_head.weight"]
    assert [m["model"] for m in head["models"]] == ["ev-a", "ev-b"]  # the base is not a merged entry
    assert head["models"][0]["parameters"]["weight"] == 0.6
    assert head["parameters"]["normalize"] is True and head["parameters"]["tie_break"] == "mergekit"


@pytest.mark.parametrize(
    "recipe,status,message",
    [
        (RECIPE.replace("density: 0.5", "density: 1.5"), 422, "density must be in (0, 1]"),
        (RECIPE.replace("model: ev-a", "model: ev-missing"), 422, "not registered"),
        (RECIPE.replace("name: ev-ties", "name: ev-a"), 409, "already exists"),
        ("merge_method: [unclosed", 422, "not valid YAML"),
        (RECIPE.replace("merge_method: ties", "merge_method: nope"), 422, "unknown merge_method"),
    ],
)
def test_merge_validate_answers_the_same_4xx_as_a_submission(server, family, recipe, status, message):
    with server.client() as c:
        checked = c.post("/v1/merges/validate", content=recipe, headers=YAML)
        submitted = c.post("/v1/merges", content=recipe, headers=YAML)
    assert checked.status_code == submitted.status_code == status, checked.text
    assert message in checked.text and checked.json() == submitted.json()


def test_console_page_and_assets_are_served_without_a_key_but_data_is_not(tmp_path, isolated_redis_url):
    settings = Settings(
        home=tmp_path / "home",
        redis_url=isolated_redis_url,
        default_model=False,
        import_roots=[tmp_path],
        api_keys="console-key",
    )
    with TestClient(create_app(settings)) as c:
        page = c.get("/")
        script = c.get("/console/main.js")
        escape = c.get("/console/../service/app.py")
        events = c.get("/v1/jobs/anything/events")
        validate = c.post("/v1/merges/validate", content="merge_method: linear", headers=YAML)
        keyed = c.get("/v1/jobs/anything/events", headers={"Authorization": "Bearer console-key"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/console/main.js">' in page.text
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert escape.status_code in (401, 404)
    assert events.status_code == 401 and validate.status_code == 401
    assert keyed.status_code == 404
