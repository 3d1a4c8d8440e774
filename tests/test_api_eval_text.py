"""The user's own evaluation text through the API: `profile` with `eval_text` (inline, a file under an import
root, or a bundled held-out text by name) measures quality on it and on the broad held-out, designates it for
quality floors (named in every answer's strata.quality) and keeps it for later profiles; bad texts get a
clear 4xx and leave the profile as it was."""

from __future__ import annotations

import pytest

from tests.tiny_models import make_tiny_chat_llama
from workers.eval.eval_text import MAX_EVAL_TEXT_BYTES

MODEL = "evaluated"
USER_TEXT = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep. " * 8


@pytest.fixture(scope="module")
def evaluated(server):
    path = server.home.parent / MODEL
    make_tiny_chat_llama(path, seed=43)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": MODEL, "path": str(path)}).status_code == 201
    return path


def profile(server, **extra) -> dict:
    return server.run_job({"kind": "profile", "model": MODEL, "repeats": 1, "grid": [2, 4], **extra})


def stored_profile(server) -> dict:
    with server.client() as c:
        return c.get(f"/v1/models/{MODEL}").json()["strata"]["profile"]


def test_a_profile_measures_the_broad_held_out_by_default(server, evaluated):
    result = profile(server)
    assert result["eval_text"] == "broad" and list(result["texts"]) == ["broad"]
    stored = stored_profile(server)
    assert stored["eval_text"] == "broad" and stored["quality_by_text"]["broad"]["tokens"] == 2048
    assert stored["quality_by_text"]["broad"]["quality"] == stored["quality"]


def test_the_users_inline_text_is_designated_named_in_answers_and_kept(server, evaluated):
    result = profile(server, eval_text={"name": "mine", "text": USER_TEXT})
    assert result["eval_text"] == "mine" and list(result["texts"]) == ["mine", "broad"]
    assert result["texts"]["mine"] == {"tokens": len(USER_TEXT), "source": "inline"}  # characters = tokens
    stored = stored_profile(server)
    assert stored["eval_text"] == "mine" and stored["quality"] == stored["quality_by_text"]["mine"]["quality"]
    assert stored["quality"] != stored["quality_by_text"]["broad"]["quality"]
    full = stored["quality"]["4"]["perplexity"]
    request = {"model": MODEL, "prompt": "the fox", "max_new_tokens": 2, "depth": 2}
    with server.client() as c:
        r = c.post("/v1/generate", json=request)
    quality = r.json()["strata"]["quality"]
    assert quality["eval_text"] == "mine"
    assert quality["perplexity_ratio"] == pytest.approx(stored["quality"]["2"]["perplexity"] / full, rel=1e-3)
    again = profile(server)  # a later profile without eval_text keeps the user's text designated
    assert again["eval_text"] == "mine" and again["texts"]["mine"]["tokens"] == len(USER_TEXT)
    named = profile(server, eval_text={"name": "dpkg-spec"})  # a bundled held-out text by name
    assert named["eval_text"] == "dpkg-spec" and list(named["texts"]) == ["dpkg-spec", "broad"]


def test_a_text_file_under_an_import_root_is_read_and_named_after_it(server, evaluated):
    path = server.home.parent / "support-tickets.txt"
    path.write_text(USER_TEXT, encoding="utf-8")
    result = profile(server, eval_text={"path": str(path)})
    assert result["eval_text"] == "support-tickets" and result["texts"]["support-tickets"]["source"] == "file"


@pytest.mark.parametrize(
    "kind,status,message",
    [
        ("short", 422, "at least one window of 256"),
        ("not_utf8", 422, "not UTF-8"),
        ("too_large", 413, f"at most {MAX_EVAL_TEXT_BYTES:,}"),
        ("unknown_name", 404, "no evaluation text named 'poems'"),
        ("bundled_name", 422, "is a bundled evaluation text"),
        ("outside_roots", 422, "outside the import roots"),
        ("missing_file", 422, "no file at"),
        ("text_and_path", 422, "not text and path"),
        ("bad_name", 422, "should match pattern"),
    ],
)
def test_bad_evaluation_texts_get_a_clear_4xx_and_leave_the_profile_as_it_was(
    server, evaluated, tmp_path, kind, status, message
):
    root = server.home.parent
    (root / "latin1.txt").write_bytes(("caf\xe9 " * 200).encode("latin-1"))
    (root / "huge.txt").write_bytes(b"a" * (MAX_EVAL_TEXT_BYTES + 1))
    outside = tmp_path / "outside.txt"
    outside.write_text(USER_TEXT, encoding="utf-8")
    spec = {
        "short": {"text": "too short"},
        "not_utf8": {"path": str(root / "latin1.txt")},
        "too_large": {"path": str(root / "huge.txt")},
        "unknown_name": {"name": "poems"},
        "bundled_name": {"name": "broad", "text": USER_TEXT},
        "outside_roots": {"path": str(outside)},
        "missing_file": {"path": str(root / "nothing-here.txt")},
        "text_and_path": {"text": USER_TEXT, "path": str(root / "latin1.txt")},
        "bad_name": {"name": "../../etc", "text": USER_TEXT},
    }[kind]
    before = stored_profile(server)
    with server.client() as c:
        r = c.post("/v1/jobs", json={"kind": "profile", "model": MODEL, "eval_text": spec})
    assert r.status_code == status and message in r.text, r.text
    assert "caf" not in r.text and "quick brown" not in r.text  # no file content echoed
    assert stored_profile(server) == before
