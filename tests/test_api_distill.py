"""The distill job through the API: files with purpose "distill", teachers from the data, a configured
endpoint (a real local HTTP server) and a registered model, the evaluation in the result and the record,
the teacher cache across a retried job, and bad input (4xx, or a one-line job failure with nothing
registered)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import _real_redis, start_server, stop_server
from tests.teacher_endpoint import teacher_endpoint
from tests.tiny_models import DISTILL_VOCAB_SIZE, distill_tokenizer, make_tiny_chat_llama, make_tiny_llama
from workers.distill import multistep

TRAIN = [{**r, "input": r["input"][:70].strip()} for r in multistep.load("train")[:12]]
TEST = [{**r, "input": r["input"][:70].strip()} for r in multistep.load("test")[:3]]
GOLD = {r["input"]: r for r in TRAIN + TEST}
OPTIONS = {"steps": 3, "batch_size": 4, "lr": 1e-3, "max_length": 96, "label_max_new_tokens": 4}


def _answer(route: str, call: int, query: str) -> str | None:
    """/ok/v1 knows the gold answers (the first of each two training inputs it answers wrongly, to be
    dropped); /down/v1 is always 503."""
    if route != "ok":
        return None
    gold = GOLD[query.split("\nReasoning:")[0]]
    wrong = TRAIN.index(gold) % 2 == 0 if gold in TRAIN else False
    label = str(int(gold["label"]) + 1) if wrong else gold["label"]
    return f"{gold['rationale']}\nAnswer: {label}"


@pytest.fixture(scope="module")
def teacher():
    with teacher_endpoint(_answer) as served:
        yield served


@pytest.fixture(scope="module")
def distill_server(tmp_path_factory, teacher):
    """`strata serve` with teacher endpoints configured: local (allowed), down (allowed, always 503) and
    far (a host not on the allow-list); a tiny student with a tokenizer that spells the format, one
    without, and a tiny random teacher model."""
    root = tmp_path_factory.mktemp("distill")
    redis = _real_redis(root / "redis")
    url = next(redis)
    endpoints = {
        "local": {"url": f"{teacher.url}/ok/v1", "api_key": "sk-teacher"},
        "down": {"url": f"{teacher.url}/down/v1"},
        "far": {"url": "https://teacher.example/v1"},
    }
    env = {
        "REDIS_URL": url,
        "STRATA_TEACHER_ENDPOINTS": json.dumps(endpoints),
        "STRATA_TEACHER_HOSTS": "127.0.0.1",
    }
    server = start_server(root / "home", env, infer_workers=0)
    make_tiny_llama(root / "student", seed=0, vocab_size=DISTILL_VOCAB_SIZE, max_position_embeddings=1024)
    distill_tokenizer().save_pretrained(root / "student")
    make_tiny_chat_llama(root / "chars", seed=1)
    with server.client() as c:
        for model_id, path in (("student", root / "student"), ("chars", root / "chars")):
            assert c.post("/v1/models/import", json={"id": model_id, "path": str(path)}).status_code == 201
    try:
        yield server
    finally:
        stop_server(server)
        next(redis, None)


def upload(c: httpx.Client, records: list[dict], purpose: str = "distill") -> httpx.Response:
    content = "".join(json.dumps(r) + "\n" for r in records).encode()
    return c.post("/v1/files", files={"file": ("d.jsonl", content)}, data={"purpose": purpose})


@pytest.fixture(scope="module")
def data_files(distill_server) -> dict[str, str]:
    with distill_server.client() as c:
        ids = {"train": upload(c, TRAIN).json()["id"], "test": upload(c, TEST).json()["id"]}
        unlabelled = [{"input": r["input"]} for r in TRAIN]
        ids["unlabelled"] = upload(c, unlabelled).json()["id"]
    return ids


def body(files: dict[str, str], **extra) -> dict:
    return {
        "kind": "distill",
        "student": "student",
        "teacher": "data",
        "train_file": files["train"],
        "eval_file": files["test"],
        **OPTIONS,
        **extra,
    }


def test_rationales_in_the_data_train_the_student_and_both_baselines(distill_server, data_files):
    result = distill_server.run_job(
        body(data_files, baselines=["label_only", "distill_labels"], rationale_weight=0.5, name="sbs-data")
    )
    assert result["model"] == "sbs-data"
    assert set(result["eval"]) == {"step_by_step", "label_only", "distill_labels"}
    for entry in result["eval"].values():
        assert 0 <= entry["accuracy"] <= 1 and entry["examples"] == len(TEST)
    assert result["training"]["step_by_step"]["rationale_rows"] == len(TRAIN)
    with distill_server.client() as c:
        record = c.get("/v1/models/sbs-data").json()["strata"]
    assert record["eval"] == result["eval"] and record["parents"] == ["student"]
    assert record["recipe"]["data"]["train"]["file"] == data_files["train"]


def test_an_endpoint_teacher_is_asked_filtered_scored_and_cached_for_a_retry(
    distill_server, data_files, teacher
):
    spec = body(data_files, teacher={"endpoint": "local", "model": "big"}, baselines=["distill_labels"])
    first = distill_server.run_job({**spec, "name": "sbs-endpoint"})
    asked = teacher.calls["ok"]
    assert asked == len(TRAIN) + len(TEST) and set(teacher.keys) == {"Bearer sk-teacher"}
    assert first["teacher_data"] == {
        "queried": len(TRAIN),
        "kept": len(TRAIN) // 2,
        "unparseable": 0,
        "disagree": len(TRAIN) // 2,
        "from_cache": 0,
    }
    assert (
        first["eval"]["teacher"]["accuracy"] == 1.0 and first["training"]["step_by_step"]["label_rows"] == 6
    )
    again = distill_server.run_job({**spec, "name": "sbs-endpoint-2"})  # the same request, retried
    assert teacher.calls["ok"] == asked and again["teacher_data"]["from_cache"] == asked
    assert again["eval"]["teacher"] == first["eval"]["teacher"]


def test_a_failing_teacher_fails_the_job_with_the_reason_and_registers_nothing(distill_server, data_files):
    with distill_server.client() as c:
        r = c.post(
            "/v1/jobs", json=body(data_files, teacher={"endpoint": "down", "model": "m"}, name="never")
        )
        assert r.status_code == 202, r.text
        view = distill_server.wait_job(r.json()["id"], timeout=300)
        assert view["status"] == "failed"
        assert "HTTP 503" in view["error"] and "0 of 15 teacher answers are cached" in view["error"]
        assert "\n" not in view["error"] and "Traceback" not in view["error"]
        assert c.get("/v1/models/never").status_code == 404


def test_a_teacher_model_whose_answers_never_parse_leaves_nothing_to_train(
    distill_server, data_files, tmp_path
):
    with distill_server.client() as c:
        spec = body(
            data_files, teacher={"model": "student", "depth": 2}, teacher_max_new_tokens=8, name="none"
        )
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 202, r.text
        view = distill_server.wait_job(r.json()["id"], timeout=300)
        assert view["status"] == "failed" and "no training records left" in view["error"]
        assert f"{len(TRAIN)} unparseable" in view["error"] or "disagree" in view["error"]
        assert c.get("/v1/models/none").status_code == 404


@pytest.mark.parametrize(
    "change, status, message",
    [
        ({"teacher": {"endpoint": "nowhere", "model": "m"}}, 422, "not configured"),
        ({"teacher": {"endpoint": "far", "model": "m"}}, 422, "not on the allow-list"),
        ({"teacher": {"model": "student", "depth": 99}}, 422, "teacher.depth"),
        ({"student": "chars"}, 422, "cannot spell '[label]'"),
        ({"task": {"type": "classification"}}, 422, "needs labels"),
        ({"task": {"type": "classification", "labels": ["a", "b"]}}, 422, "not one of the task's labels"),
        ({"train_file": "unlabelled"}, 422, "needs training records with a rationale"),
        ({"eval_file": "unlabelled"}, 422, "needs a gold label"),
        ({"train_file": "file-000000000000000000000000"}, 422, "no such file"),
        ({"train_file": "/etc/passwd"}, 422, "train_file"),
        ({"rationale_weight": -1}, 422, "rationale_weight"),
        ({"baselines": ["teacher"]}, 422, "baselines"),
        ({"teacher": {"endpoint": "local", "model": "m", "url": "http://evil"}}, 422, "teacher"),
    ],
)
def test_bad_requests_are_refused_before_queueing(distill_server, data_files, change, status, message):
    spec = body(data_files, **change)
    for key in ("train_file", "eval_file"):
        if spec[key] in data_files:
            spec[key] = data_files[spec[key]]
    with distill_server.client() as c:
        r = c.post("/v1/jobs", json=spec)
    assert r.status_code == status, r.text
    assert message in r.text


def test_malformed_records_are_refused_at_upload_and_fine_tune_files_are_not_distill_data(
    distill_server, data_files
):
    with distill_server.client() as c:
        bad = upload(c, [{"input": "ok", "label": "1"}, {"input": "x", "answer": "2"}])
        assert bad.status_code == 400 and "line 2" in bad.json()["detail"]
        chat = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
        fine_tune = upload(c, chat, purpose="fine-tune").json()["id"]
        r = c.post("/v1/jobs", json=body(data_files, train_file=fine_tune))
        assert r.status_code == 422 and "purpose 'distill'" in r.text
        ft = {"kind": "finetune", "model": "student", "training_file": data_files["train"], "steps": 1}
        r = c.post("/v1/jobs", json=ft)
    assert r.status_code == 422 and "uploaded for 'distill', not 'fine-tune'" in r.text
