"""The bundled texts exit adapters are fitted on: chat answers, general text, everyday prose, or chat and
general in turn."""

from __future__ import annotations

from workers.early_exit.fit_data import bundled_paths, bundled_records
from workers.generation.profiler import HELDOUT_PATH


def test_each_bundled_text_is_its_own_files_and_mixed_takes_one_record_of_each_in_turn():
    chat, general, mixed = bundled_records("chat"), bundled_records("general"), bundled_records("mixed")
    assert [p.name for p in bundled_paths("general")] == ["general.jsonl"]
    assert "general.jsonl" not in [p.name for p in bundled_paths("chat")]
    assert all("messages" in r for r in chat) and all({"prompt", "response"} <= set(r) for r in general)
    assert len(mixed) == len(chat) + len(general)
    assert mixed[:4] == [chat[0], general[0], chat[1], general[1]]
    assert bundled_records() == chat  # the default
    everyday = bundled_records("everyday")
    assert [p.name for p in bundled_paths("everyday")] == ["everyday.jsonl"] and len(everyday) > 300
    assert all({"prompt", "response"} <= set(r) for r in everyday)


def test_no_bundled_text_contains_the_held_out_text():
    heldout = [line for line in HELDOUT_PATH.read_text(encoding="utf-8").splitlines() if len(line) > 40]
    parts = [
        m["content"] if "messages" in r else r["prompt"] + r["response"]
        for text in ("mixed", "everyday")
        for r in bundled_records(text)
        for m in r.get("messages", [r])
    ]
    text = "\n".join(parts)
    assert heldout and not any(line[:40] in text for line in heldout)
