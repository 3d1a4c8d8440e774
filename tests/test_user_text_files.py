"""Uploaded files as the user's own text: a `user_data` upload is a profile's evaluation text
(`eval_text: {"file": id}`), a `fine-tune` upload is fit_exits' fitting text (`training_file`); a file of
the other purpose, an unknown id, a text shorter than one window or a non-UTF-8 upload get a clear 4xx and
nothing changes."""

from __future__ import annotations

import json

import pytest

from tests.tiny_models import make_tiny_chat_llama

MODEL = "user-texts"
USER_TEXT = "The river rose in the night and the ferryman tied his boat to the old willow. " * 8
RECORDS = [
    {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}."}]}
    for w in ("tea", "sun", "rain", "moon", "bread", "stone", "river", "cloud")
]


@pytest.fixture(scope="module")
def model(server):
    path = server.home.parent / MODEL
    make_tiny_chat_llama(path, seed=47)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": MODEL, "path": str(path)}).status_code == 201
    return path


def upload(server, content: bytes, purpose: str) -> dict:
    with server.client() as c:
        r = c.post("/v1/files", files={"file": ("mine.txt", content)}, data={"purpose": purpose})
    assert r.status_code == 200, r.text
    return r.json()


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def stored(server) -> dict:
    with server.client() as c:
        return c.get(f"/v1/models/{MODEL}").json()["strata"]


def test_an_uploaded_text_is_a_profiles_evaluation_text(server, model):
    file = upload(server, USER_TEXT.encode(), "user_data")
    assert file["purpose"] == "user_data" and file["records"] == 1
    with server.client() as c:
        content = c.get(f"/v1/files/{file['id']}/content")
    assert content.text == USER_TEXT and content.headers["content-type"].startswith("text/plain")
    result = server.run_job(
        {"kind": "profile", "model": MODEL, "repeats": 1, "grid": [2, 4], "eval_text": {"file": file["id"]}}
    )
    assert result["eval_text"] == file["id"] and result["texts"][file["id"]] == {
        "tokens": len(USER_TEXT),  # a character a token
        "source": "file",
    }
    named = server.run_job(
        {"kind": "profile", "model": MODEL, "repeats": 1, "grid": [2, 4],
         "eval_text": {"file": file["id"], "name": "river"}}
    )  # fmt: skip
    assert named["eval_text"] == "river" and stored(server)["profile"]["eval_text"] == "river"


def test_fit_exits_fits_on_an_uploaded_training_file(server, model):
    file = upload(server, jsonl(RECORDS), "fine-tune")
    result = server.run_job({"kind": "fit_exits", "model": MODEL, "training_file": file["id"], "seq_len": 32})
    data = result["data"]
    assert data["source"] == "uploaded" and data["file"] == file["id"] and data["records"] == len(RECORDS)
    assert data["sha256_16"] == file["sha256"][:16] and data["tokens"] > 32
    assert stored(server)["exit_adapters"]["data"]["file"] == file["id"]


def test_fit_exits_mixes_a_users_text_with_the_bundled_and_weighs_it(server, model):
    file = upload(server, jsonl(RECORDS), "fine-tune")
    result = server.run_job(
        {"kind": "fit_exits", "model": MODEL, "training_file": file["id"], "seq_len": 32, "exits": [2],
         "mix_bundled": True, "user_weight": 8, "bundled": "prose", "max_tokens": 2048}
    )  # fmt: skip
    data = result["data"]
    assert data["source"] == "uploaded" and data["user_weight"] == 8.0
    assert data["bundled"]["text"] == "prose" and data["bundled"]["files"] == ["prose.jsonl"]
    assert data["bundled"]["tokens"] == 2048 and data["tokens"] == data["tokens_user"] + 2048
    assert stored(server)["exit_adapters"]["recipe"]["mix_bundled"] is True
    # the prose held-out text shares the bundled text's source: in-domain now
    assert "heldout" in result["generalisation"]["in_domain"]


@pytest.mark.parametrize(
    "case,status,message",
    [
        ("training_file_for_eval", 422, "upload the text with purpose 'user_data'"),
        ("unknown_eval_file", 404, "no such file"),
        ("eval_file_and_text", 422, "not text and file"),
        ("user_data_for_fit", 422, "not 'fine-tune'"),
        ("unknown_fit_file", 422, "no such file"),
        ("short_fit_file", 422, "at least one window of seq_len=256"),
        ("fit_file_and_examples", 422, "not training_file and examples"),
        ("user_data_for_finetune", 422, "not 'fine-tune'"),
        ("mix_without_user_text", 422, "mix_bundled needs your text"),
        ("weight_without_mix", 422, "it needs mix_bundled"),
        ("too_heavy", 422, "user_weight"),
    ],
)
def test_files_of_the_wrong_kind_or_too_short_get_a_clear_4xx(server, model, case, status, message):
    text = upload(server, USER_TEXT.encode(), "user_data")["id"]
    training = upload(server, jsonl(RECORDS[:1]), "fine-tune")["id"]
    missing = "file-" + "0" * 24
    body = {
        "training_file_for_eval": {"kind": "profile", "eval_text": {"file": training}},
        "unknown_eval_file": {"kind": "profile", "eval_text": {"file": missing}},
        "eval_file_and_text": {"kind": "profile", "eval_text": {"file": text, "text": USER_TEXT}},
        "user_data_for_fit": {"kind": "fit_exits", "training_file": text},
        "unknown_fit_file": {"kind": "fit_exits", "training_file": missing},
        "short_fit_file": {"kind": "fit_exits", "training_file": training},
        "fit_file_and_examples": {"kind": "fit_exits", "training_file": training, "examples": RECORDS},
        "user_data_for_finetune": {"kind": "finetune", "training_file": text, "steps": 1},
        "mix_without_user_text": {"kind": "fit_exits", "mix_bundled": True},
        "weight_without_mix": {"kind": "fit_exits", "examples": RECORDS, "user_weight": 4},
        "too_heavy": {"kind": "fit_exits", "examples": RECORDS, "mix_bundled": True, "user_weight": 5000},
    }[case]
    before = stored(server)
    with server.client() as c:
        r = c.post("/v1/jobs", json={"model": MODEL, **body})
    assert r.status_code == status and message in r.text, r.text
    assert "ferryman" not in r.text and "say tea" not in r.text  # no content echoed
    assert stored(server) == before


@pytest.mark.parametrize(
    "content,message",
    [(("caf\xe9 " * 50).encode("latin-1"), "not UTF-8"), (b"   \n\n", "no text"), (b"a\x00b", "NUL")],
)
def test_a_user_data_upload_that_is_not_text_stores_nothing(server, content, message):
    with server.client() as c:
        before = c.get("/v1/files").json()["data"]
        r = c.post("/v1/files", files={"file": ("t.txt", content)}, data={"purpose": "user_data"})
        assert r.status_code == 400 and message in r.text, r.text
        assert c.get("/v1/files").json()["data"] == before
