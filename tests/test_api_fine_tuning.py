"""OpenAI's files and fine-tuning API, driven by the official `openai` client against a real server."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest

from tests.tiny_models import make_tiny_chat_llama

BASE = "ft-base"
PAIRS = [
    ("say hi", "hi there."),
    ("name a colour", "blue."),
    ("count to two", "one, two."),
    ("what is ice", "frozen water."),
    ("greet me", "good day."),
    ("spell dog", "d, o, g."),
]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def chats(pairs=PAIRS) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs
    ]


@pytest.fixture(scope="session")
def ft_base(server) -> str:
    path = server.home.parent / BASE
    make_tiny_chat_llama(path, seed=3)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": BASE, "path": str(path)}).status_code == 201
    return BASE


@pytest.fixture
def sent_headers() -> list[httpx.Headers]:
    return []


@pytest.fixture
def client(server, sent_headers) -> openai.OpenAI:
    hooks = {"request": [lambda request: sent_headers.append(request.headers)]}
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="unused", http_client=httpx.Client(event_hooks=hooks)
    )


def stored_files(server) -> set[str]:
    root = server.home / "files"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def wait_done(client: openai.OpenAI, job_id: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"{job_id} did not end in {timeout} s")


def test_the_openai_client_uploads_fine_tunes_follows_events_and_chats(server, ft_base, client, sent_headers):
    upload = client.files.create(file=("chats.jsonl", io.BytesIO(jsonl(chats() * 4))), purpose="fine-tune")
    headers = sent_headers[-1]
    assert headers["content-type"].startswith("multipart/form-data") and "origin" not in headers
    assert headers["authorization"] == "Bearer unused"
    assert (
        upload.id.startswith("file-") and upload.purpose == "fine-tune" and upload.filename == "chats.jsonl"
    )
    assert client.files.retrieve(upload.id).bytes == upload.bytes
    assert upload.id in [f.id for f in client.files.list()]
    held = client.files.create(file=("val.jsonl", io.BytesIO(jsonl(chats()[:2]))), purpose="fine-tune")

    job = client.fine_tuning.jobs.create(
        model=ft_base,
        training_file=upload.id,
        validation_file=held.id,
        suffix="tiny",
        seed=5,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 30}
            },
        },
    )
    assert job.status in ("queued", "running") and job.id.startswith("ftjob-")
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    done = wait_done(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith(f"{ft_base}-ft-tiny-") and done.trained_tokens > 0
    assert done.finished_at >= done.created_at

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))  # pages through all of them
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed"
    assert messages[-1] == f"Created fine-tuning job: {job.id}"
    metrics = [e.data for e in events if e.type == "metrics"][::-1]
    assert [m["step"] for m in metrics] == list(range(1, 13))  # 24 records, 4 a batch, 2 epochs
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert "valid_loss" in metrics[-1]
    assert job.id in [j.id for j in client.fine_tuning.jobs.list()]

    with server.client() as c:
        record = c.get(f"/v1/models/{done.fine_tuned_model}").json()["strata"]
    assert record["parents"] == [ft_base]
    assert record["recipe"]["data"]["file"] == upload.id and len(record["recipe"]["data"]["sha256"]) == 64
    chat = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "say hi"}], max_tokens=4
    )
    assert chat.choices[0].message.role == "assistant" and chat.model == done.fine_tuned_model

    assert client.files.delete(held.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(held.id)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not json\n", "line 1: invalid JSON"),
        (jsonl(chats()) + b'{"messages": [{"role": "user", "content": "q"}]}\n', "line 7: 'messages' has no"),
        (b'{"prompt": "a", "completion": "b"}\n[1, 2]\n', "line 2: expected a JSON object"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"\n\n", "no records"),
    ],
)
def test_a_bad_upload_is_400_naming_the_line_and_stores_nothing(server, client, content, message):
    before = stored_files(server)
    with pytest.raises(openai.BadRequestError) as error:
        client.files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="fine-tune")
    assert message in error.value.body["detail"]
    assert stored_files(server) == before


def test_an_upload_over_the_limit_or_for_another_purpose_stores_nothing(server, client):
    before = stored_files(server)
    with pytest.raises(openai.APIStatusError) as error:
        client.files.create(file=("big.jsonl", io.BytesIO(b" " * (33 << 20))), purpose="fine-tune")
    assert error.value.status_code == 413 and "STRATA_MAX_FILE_BYTES" in error.value.body["detail"]
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", io.BytesIO(jsonl(chats()))), purpose="assistants")
    assert stored_files(server) == before


@pytest.mark.parametrize(
    "file_id", ["..%2F..%2Fetc%2Fpasswd", "file-..%2Fx", "file-0123", "file-" + "g" * 24]
)
def test_a_file_id_cannot_hold_a_path(server, file_id):
    with server.client() as c:
        assert c.get(f"/v1/files/{file_id}").status_code == 404
        assert c.get(f"/v1/files/{file_id}/content").status_code == 404
        assert c.delete(f"/v1/files/{file_id}").status_code == 404


@pytest.fixture(scope="module")
def training_file(server) -> str:
    with server.client() as c:
        r = c.post("/v1/files", files={"file": ("t.jsonl", jsonl(chats()))}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.mark.parametrize(
    "change, status, message",
    [
        ({"model": "no-such-model"}, 422, "not registered"),
        ({"training_file": "../../etc/passwd"}, 400, "not a file id"),
        ({"training_file": "file-" + "0" * 24}, 400, "no such file"),
        ({"validation_file": "file-" + "0" * 24}, 422, "no such file"),
        ({"hyperparameters": {"n_epochs": 0}}, 422, "n_epochs"),
        ({"hyperparameters": {"n_epochs": "many"}}, 422, "n_epochs"),
        ({"hyperparameters": {"batch_size": 100000}}, 422, "batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, 422, "learning_rate_multiplier"),
        ({"method": {"type": "dpo"}}, 422, "type"),
        ({"suffix": "a/b"}, 422, "suffix"),
    ],
)
def test_a_bad_fine_tuning_job_is_4xx_and_queues_nothing(
    server, ft_base, training_file, change, status, message
):
    body = {"model": ft_base, "training_file": training_file, **change}
    with server.client() as c:
        before = len(c.get("/v1/jobs").json()["data"])
        r = c.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code == status, r.text
        assert message in json.dumps(r.json()["detail"])
        assert len(c.get("/v1/jobs").json()["data"]) == before


def test_unknown_fine_tuning_jobs_are_404(server):
    with server.client() as c:
        for path in ("ftjob-nope", "ftjob-" + "0" * 8 + "-0000-0000-0000-" + "0" * 12):
            assert c.get(f"/v1/fine_tuning/jobs/{path}").status_code == 404
            assert c.post(f"/v1/fine_tuning/jobs/{path}/cancel").status_code == 404


def test_a_lora_job_registers_the_merged_model_and_keeps_the_adapter(server, ft_base, training_file):
    spec = {
        "kind": "finetune",
        "model": ft_base,
        "training_file": training_file,
        "method": "lora",
        "lora_r": 4,
        "steps": 3,
        "batch_size": 2,
        "max_length": 32,
        "name": "ft-lora-out",
    }
    with server.client() as c:
        job = c.post("/v1/jobs", json=spec)
        assert job.status_code == 202, job.text
        view = server.wait_job(job.json()["id"])
        assert view["status"] == "finished", view["error"]
        assert view["result"]["truncated"] == len(PAIRS)  # every record is longer than 32 tokens
        record = c.get("/v1/models/ft-lora-out").json()["strata"]
    assert record["parents"] == [ft_base] and record["recipe"]["method"] == "lora"
    # stored as its base + a compressed delta (served over the resident base), its weights kept beside it
    assert record["base_model"] == ft_base and record["delta"]["max_relative_error"] <= 0.05
    assert record["delta"]["bytes_vs_base"] < 0.5
    adapter = server.home / "models" / "ft-lora-out" / "lora_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (adapter / "adapter_model.safetensors").is_file()


def test_a_crashed_finetune_fails_in_one_line_and_registers_nothing(server, ft_base, training_file):
    spec = {"kind": "finetune", "model": ft_base, "training_file": training_file, "method": "lora"}
    spec |= {"lora_targets": ["no_such_layer"], "steps": 2, "name": "ft-crashed"}
    with server.client() as c:
        view = server.wait_job(c.post("/v1/jobs", json=spec).json()["id"])
        assert view["status"] == "failed" and "lora_targets" in view["error"]
        assert "\n" not in view["error"] and "Traceback" not in view["error"]
        assert c.get("/v1/models/ft-crashed").status_code == 404
    assert not (server.home / "models" / "ft-crashed").exists()
    assert not list((server.home / "models" / ".staging").iterdir())


def test_a_cancelled_fine_tune_registers_nothing_and_leaves_no_files(server, client):
    path = server.home.parent / "ft-slow"  # about 25 M parameters: a training step takes a while
    make_tiny_chat_llama(path, seed=4, hidden_size=512, intermediate_size=2048, num_hidden_layers=8)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "ft-slow", "path": str(path)}).status_code == 201
        upload = c.post(
            "/v1/files",
            files={"file": ("s.jsonl", jsonl([{"text": "the cat sat on the mat " * 8}] * 64))},
            data={"purpose": "fine-tune"},
        ).json()
    job = client.fine_tuning.jobs.create(
        model="ft-slow", training_file=upload["id"], suffix="doomed", hyperparameters={"n_epochs": 50}
    )
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data):
        assert client.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running")
        assert time.monotonic() < deadline, "no training step in 120 s"
        time.sleep(0.2)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert wait_done(client, job.id).status == "cancelled"
    events = client.fine_tuning.jobs.list_events(job.id).data
    assert events[0].message == "The job was cancelled"
    time.sleep(1)  # the worker removes a stopped work-horse's staging directory
    assert not list((server.home / "models" / ".staging").iterdir())
    assert not [p for p in (server.home / "models").iterdir() if "doomed" in p.name]
    with server.client() as c:
        assert not [m for m in c.get("/v1/models").json()["data"] if "doomed" in m["id"]]
