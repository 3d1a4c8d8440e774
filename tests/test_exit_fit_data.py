"""The bundled texts exit adapters are fitted on: chat answers, general text, everyday samples, original
prose, the broad human-written corpus, and the mixes (chat and general in turn; prose and chat in turn; broad,
prose and chat in turn, the default); the held-out texts none of them contains."""

from __future__ import annotations

import json

from workers.early_exit.fit_data import DEFAULT_TEXT, bundled_paths, bundled_records
from workers.eval.heldout import DEFAULT_EVAL_TEXT, heldout_texts
from workers.eval.texts import bundled_text
from workers.generation.profiler import HELDOUT_PATH


def test_each_bundled_text_is_its_own_files_and_mixed_takes_one_record_of_each_in_turn():
    chat, general, mixed = bundled_records("chat"), bundled_records("general"), bundled_records("mixed")
    assert [p.name for p in bundled_paths("general")] == ["general.jsonl"]
    assert "general.jsonl" not in [p.name for p in bundled_paths("chat")]
    assert all("messages" in r for r in chat) and all({"prompt", "response"} <= set(r) for r in general)
    assert len(mixed) == len(chat) + len(general)
    assert mixed[:4] == [chat[0], general[0], chat[1], general[1]]
    everyday = bundled_records("everyday")
    assert [p.name for p in bundled_paths("everyday")] == ["everyday.jsonl"] and len(everyday) > 300
    assert all({"prompt", "response"} <= set(r) for r in everyday)


def test_prose_and_chat_takes_a_prose_record_and_a_chat_record_in_turn():
    prose, chat, mix = bundled_records("prose"), bundled_records("chat"), bundled_records("prose+chat")
    assert [p.name for p in bundled_paths("prose")] == ["prose.jsonl"] and len(prose) == 66
    assert all({"prompt", "response"} <= set(r) and len(r["response"]) > 1500 for r in prose)
    assert len(mix) == len(prose) + len(chat)
    assert mix[:4] == [prose[0], chat[0], prose[1], chat[1]]
    assert mix[2 * len(prose) :] == chat[len(prose) :]  # the rest of the chat records follow


def test_the_default_text_takes_a_broad_a_prose_and_a_chat_record_in_turn():
    broad, prose, chat = bundled_records("broad"), bundled_records("prose"), bundled_records("chat")
    default = bundled_records()
    assert DEFAULT_TEXT == "broad+prose+chat" and len(default) == len(broad) + len(prose) + len(chat)
    assert default[:6] == [broad[0], prose[0], chat[0], broad[1], prose[1], chat[1]]
    names = ["broad.jsonl", "prose.jsonl", *(p.name for p in bundled_paths("chat"))]
    assert [p.name for p in bundled_paths()] == names


def test_the_broad_corpus_spans_its_sources_in_turn_and_keeps_their_held_out_splits_apart():
    broad = bundled_records("broad")
    sources = ["gnu-manuals", "vim-manual", "python-reference", "python-docstrings", "legal"]
    assert [r["source"] for r in broad[:5]] == sources  # any prefix spans every source
    assert all(r["prompt"] == "" and len(r["response"]) > 200 for r in broad)
    texts = heldout_texts()
    assert set(sources) | {"heldout", "heldout_prose", "dpkg-spec", DEFAULT_EVAL_TEXT} == set(texts)
    assert [n for n, t in texts.items() if t.out_of_domain and n != DEFAULT_EVAL_TEXT] == ["dpkg-spec"]
    fitted = "\n".join(r["response"] for r in broad)
    for name, text in texts.items():  # no held-out paragraph of a source is in the fitting text
        paragraphs = [p for p in text.text.split("\n\n") if len(p) > 80]
        assert paragraphs and not any(p in fitted for p in paragraphs), name
    assert "dpkg" not in fitted and "trigger" not in fitted.lower()  # the out-of-domain source never fitted
    first = texts[DEFAULT_EVAL_TEXT].text[:3000]
    assert texts["dpkg-spec"].text[:200] in first and texts["gnu-manuals"].text[:200] in first
    rows = [json.loads(line) for line in bundled_text("broad_heldout.jsonl").splitlines()]
    assert {r["source"] for r in rows} == {*sources, "dpkg-spec"}


def test_no_bundled_text_contains_either_held_out_text():
    heldout = [
        line
        for text in (HELDOUT_PATH.read_text(encoding="utf-8"), bundled_text("heldout_prose.txt"))
        for line in text.splitlines()
        if len(line) > 40
    ]
    parts = [
        m["content"] if "messages" in r else r["prompt"] + r["response"]
        for text in ("mixed", "everyday", "broad+prose+chat")
        for r in bundled_records(text)
        for m in r.get("messages", [r])
    ]
    text = "\n".join(parts)
    assert heldout and not any(line[:40] in text for line in heldout)
