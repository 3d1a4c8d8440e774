"""The bundled tasks: reproducible from their generator, disjoint splits, scorers that can fail."""

from __future__ import annotations

import json

import pytest

from workers import tasks
from workers.train.data import validate_record


def test_the_shipped_files_equal_a_fresh_generation(tmp_path):
    tasks.write_all(tmp_path)
    for task in tasks.TASKS:
        for split in ("train", "test"):
            assert (tmp_path / f"{task}.{split}.jsonl").read_text() == tasks.task_path(
                task, split
            ).read_text()


@pytest.mark.parametrize("task", tasks.TASKS)
def test_splits_are_disjoint_valid_chat_records(task):
    train, test = tasks.load(task, "train"), tasks.load(task, "test")
    assert (len(train), len(test)) == (tasks.TRAIN, tasks.HELD_OUT)
    prompts = [json.dumps(tasks.prompt_and_reference(r)[0]) for r in train + test]
    assert len(set(prompts)) == len(prompts)
    for record in train + test:
        validate_record(record)
        assert tasks.SCORERS[task](
            tasks.prompt_and_reference(record)[1], tasks.prompt_and_reference(record)[1]
        )


@pytest.mark.parametrize(
    "task, reply, reference, right",
    [
        ("arithmetic", "The answer is 12.", "12", True),
        ("arithmetic", "13", "12", False),
        ("arithmetic", "twelve", "12", False),
        ("topic", "Weather.", "weather", True),
        ("topic", "The topic is weather", "weather", False),
        (
            "extract",
            'Sure: {"name": "Tom", "item": "pears", "count": 3}',
            '{"name": "Tom", "item": "pears", "count": 3}',
            True,
        ),
        (
            "extract",
            '{"name": "Tom", "item": "pears", "count": "3"}',
            '{"name": "Tom", "item": "pears", "count": 3}',
            False,
        ),
        ("extract", "name: Tom", '{"name": "Tom"}', False),
    ],
)
def test_scorers(task, reply, reference, right):
    assert tasks.SCORERS[task](reply, reference) is right
    assert tasks.score(task, [reply, reference], [reference, reference]) == (1.0 if right else 0.5)


def test_unknown_tasks_are_refused():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.task_path("../etc", "train")


def test_engine_replies_equal_transformers_greedy_generate(tmp_path):
    from transformers import AutoTokenizer

    from tests.tiny_models import make_tiny_chat_llama
    from workers.generation.engine import default_eos_ids

    model = make_tiny_chat_llama(tmp_path, seed=3, max_position_embeddings=1024)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    conversations = [tasks.prompt_and_reference(r)[0] for t in tasks.TASKS for r in tasks.load(t, "test")[:2]]
    ours = tasks.replies(model, tokenizer, conversations, max_new_tokens=7, batch_size=4)
    eos = sorted(default_eos_ids(model, tokenizer))
    for conversation, reply in zip(conversations, ours, strict=True):
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        ids = model.generate(**batch, max_new_tokens=7, do_sample=False, eos_token_id=eos, pad_token_id=0)
        expected = tokenizer.decode(ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        assert reply == expected
    assert any(ours) and len(set(ours)) > 1  # real, differing replies, not empty strings
