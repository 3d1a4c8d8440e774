"""JSONL loading, response-only labels, truncation and packing."""

from __future__ import annotations

import json

import pytest

from workers.train.data import (
    IGNORE_INDEX,
    DataError,
    EncodedExample,
    collate,
    encode_record,
    load_examples,
    prepare_rows,
    read_jsonl,
)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def labelled_text(tokenizer, example: EncodedExample) -> str:
    kept = [t for t, y in zip(example.input_ids, example.labels, strict=True) if y != -100]
    return tokenizer.decode(kept, skip_special_tokens=True)


def test_prompt_response_labels_only_the_response_and_eos(chat_tokenizer):
    example = encode_record(chat_tokenizer, {"prompt": "say hi: ", "response": "hi there"})
    prompt_len = 1 + len("say hi: ")  # BOS + one token per character
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    assert example.input_ids[-1] == chat_tokenizer.eos_token_id
    assert labelled_text(chat_tokenizer, example) == "hi there"


def test_messages_label_only_assistant_turns(chat_tokenizer):
    record = {
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "second"},
            {"role": "assistant", "content": "two"},
        ]
    }
    example = encode_record(chat_tokenizer, record)
    rendered = chat_tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert example.input_ids == chat_tokenizer.encode(rendered, add_special_tokens=False)
    kept = [t for t, y in zip(example.input_ids, example.labels, strict=True) if y != -100]
    assert kept == chat_tokenizer.encode("one</s>; two</s>; ", add_special_tokens=False)
    assert all(y == -100 for y in example.labels[: len("user: first; assistant: ")])
    assert example.labels[len("user: first; assistant: ")] != -100


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "line 3: invalid JSON"),
        ('["a list"]', "line 3: expected a JSON object"),
        ('{"prompt": "p"}', "line 3: 'response' must be a string"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "line 3: 'messages' has no assistant"),
        ('{"messages": [{"role": "robot", "content": "q"}]}', "line 3: messages[0].role"),
        ('{"note": "x"}', "line 3: expected 'messages'"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, bad, message):
    good = json.dumps({"prompt": "a", "response": "b"})
    path = write_lines(tmp_path / "data.jsonl", [good, "", bad, good])
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    assert message in str(error.value)


def test_load_examples_mixes_both_formats(tmp_path, chat_tokenizer, records):
    lines = [json.dumps(records[0]), json.dumps({"prompt": "q: ", "response": "a"})]
    examples = load_examples(write_lines(tmp_path / "d.jsonl", lines), chat_tokenizer)
    assert len(examples) == 2 and all(example.trained_tokens > 0 for example in examples)


def test_messages_need_a_chat_template(tmp_path, records):
    from tests.generation.conftest import character_tokenizer

    path = write_lines(tmp_path / "d.jsonl", [json.dumps(records[0])])
    with pytest.raises(DataError, match="line 1: .*no chat template"):
        load_examples(path, character_tokenizer())


def test_truncation_and_packing():
    a = EncodedExample([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9])
    b = EncodedExample([10, 11, 12], [-100, 11, 12])
    prompt_only = EncodedExample([5, 6, 7, 8], [-100, -100, -100, 8])
    truncated = prepare_rows([a, b, prompt_only], seq_len=3, packing=False)
    assert [row.input_ids for row in truncated] == [[5, 6, 7], [10, 11, 12]]
    packed = prepare_rows([a, b], seq_len=3, packing=True)
    assert [row.input_ids for row in packed] == [[5, 6, 7], [8, 9, 10], [11, 12]]
    assert [row.labels for row in packed] == [[-100, -100, 7], [8, 9, -100], [11, 12]]
    batch = collate(truncated[:1] + packed[-1:], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [11, 12, 0]]
    assert batch.labels.tolist() == [[-100, -100, 7], [11, 12, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
