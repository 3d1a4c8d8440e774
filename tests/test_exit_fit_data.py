"""The bundled texts exit adapters are fitted on: chat answers, general text, everyday samples, original
prose, and the mixes (chat and general in turn; prose and chat in turn, the default)."""

from __future__ import annotations

from workers.early_exit.fit_data import bundled_paths, bundled_records
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


def test_the_default_text_takes_a_prose_record_and_a_chat_record_in_turn():
    prose, chat, default = bundled_records("prose"), bundled_records("chat"), bundled_records()
    assert [p.name for p in bundled_paths("prose")] == ["prose.jsonl"] and len(prose) == 66
    assert all({"prompt", "response"} <= set(r) and len(r["response"]) > 1500 for r in prose)
    assert default == bundled_records("prose+chat") and len(default) == len(prose) + len(chat)
    assert default[:4] == [prose[0], chat[0], prose[1], chat[1]]
    assert default[2 * len(prose) :] == chat[len(prose) :]  # the rest of the chat records follow
    assert [p.name for p in bundled_paths()] == ["prose.jsonl", *(p.name for p in bundled_paths("chat"))]


def test_no_bundled_text_contains_either_held_out_text():
    heldout = [
        line
        for text in (HELDOUT_PATH.read_text(encoding="utf-8"), bundled_text("heldout_prose.txt"))
        for line in text.splitlines()
        if len(line) > 40
    ]
    parts = [
        m["content"] if "messages" in r else r["prompt"] + r["response"]
        for text in ("mixed", "everyday", "prose+chat")
        for r in bundled_records(text)
        for m in r.get("messages", [r])
    ]
    text = "\n".join(parts)
    assert heldout and not any(line[:40] in text for line in heldout)
