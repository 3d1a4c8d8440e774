"""Distilling step-by-step: the answer format and its parser, scorers, the teacher cache and endpoint
client (against a real local HTTP server), the multi-task loss, and the pipeline on a tiny model."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.generation.conftest import character_tokenizer
from tests.teacher_endpoint import teacher_endpoint
from tests.tiny_models import DISTILL_VOCAB_SIZE, distill_tokenizer, make_tiny_llama
from workers.distill import kinds, multistep, shared_traits
from workers.distill.pipeline import DistillOptions, distill_step_by_step, keep_teacher_answers
from workers.distill.prompts import (
    LABEL_PREFIX,
    RATIONALE_PREFIX,
    demonstrations_for,
    parse_answer,
    teacher_prompt,
)
from workers.distill.records import TaskSpec, check_records, is_correct
from workers.distill.student import (
    check_tokenizer,
    encode_task,
    label_accuracy,
    multitask_loss,
    prefix_ids,
    train_student,
)
from workers.distill.teacher import AnswerCache, TeacherError, ask_teacher, endpoint_for, endpoint_teacher
from workers.settings import TeacherEndpoint
from workers.train.data import DataError, collate
from workers.train.trainer import causal_lm_loss

SHORT = TaskSpec()
TOPIC = TaskSpec(type="classification", labels=["sports", "food"])
CHOICE = TaskSpec(type="multiple_choice")


@pytest.mark.parametrize(
    "task, text, parsed",
    [
        (SHORT, " 2 * 3 = 6. 6 + 1 = 7.\nAnswer: 7\n\nInput: next", ("2 * 3 = 6. 6 + 1 = 7.", "7")),
        (SHORT, "Reasoning: 4 + 4 = 8.\nAnswer: 8.", ("4 + 4 = 8.", "8")),
        (SHORT, " 4 + 4 = 8, so 8.", None),  # no Answer line
        (SHORT, " Answer: 8", None),  # no rationale
        (TOPIC, " a goal is sport.\nAnswer: Sports", ("a goal is sport.", "sports")),
        (TOPIC, " it is about cars.\nAnswer: cars", None),  # outside the label set
        (CHOICE, " the second fits.\nAnswer: (B) blue", ("the second fits.", "B")),
    ],
)
def test_teacher_answers_parse_only_in_the_stated_format(task, text, parsed):
    assert parse_answer(task, text) == parsed


@pytest.mark.parametrize(
    "task, reply, gold, right",
    [
        (SHORT, "14", "14", True),
        (SHORT, "14.0", "14", True),
        (SHORT, "15", "14", False),
        (SHORT, "Paris.", "paris", True),
        (TOPIC, "FOOD", "food", True),
        (TOPIC, "sports", "food", False),
        (CHOICE, "C)", "C", True),
        (CHOICE, "D", "C", False),
    ],
)
def test_scorers(task, reply, gold, right):
    assert is_correct(task, reply, gold) is right


def test_malformed_records_and_tasks_are_refused():
    with pytest.raises(DataError, match="record|input"):
        check_records([{"input": "ok", "label": "1"}, {"text": "no input"}])
    with pytest.raises(DataError, match="line 1: 'input'"):
        check_records([{"input": "", "label": "1"}])
    with pytest.raises(DataError, match="not one of the task's labels"):
        check_records([{"input": "a match", "label": "weather"}], TOPIC)
    with pytest.raises(ValueError, match="needs labels"):
        TaskSpec(type="classification")


def test_teacher_answers_that_fail_to_parse_or_disagree_with_gold_are_dropped_and_counted():
    records = [{"input": "a", "label": "3"}, {"input": "b", "label": "4"}, {"input": "c"}]
    answers = [" 1 + 2 = 3.\nAnswer: 3", " 2 + 3 = 5.\nAnswer: 5", "no format"]
    kept, counts = keep_teacher_answers(SHORT, records, answers)
    assert kept == [{"input": "a", "rationale": "1 + 2 = 3.", "label": "3"}]
    assert counts == {"queried": 3, "kept": 1, "unparseable": 1, "disagree": 1}


def test_the_few_shot_prompt_shows_the_demonstrations_and_ends_at_the_reasoning_cue():
    demos = demonstrations_for(SHORT, None, multistep.load("train"))
    prompt = teacher_prompt(SHORT, demos, "What is 2 + 2?")
    assert prompt.endswith("Input: What is 2 + 2?\nReasoning:")
    assert prompt.count("Answer: ") == 3 and demos[0]["rationale"] in prompt
    with pytest.raises(ValueError, match="needs demonstrations"):
        demonstrations_for(TOPIC, None, [{"input": "x", "label": "food"}])


def reproduced_splits(task, name: str, tmp_path) -> tuple[list[dict], list[dict]]:
    """A bundled task's files equal a fresh generation (`<name>.<split>.jsonl`); its (train, test) records,
    as many as it declares and no input in both."""
    task.write(tmp_path)
    for split in ("train", "test"):
        assert (tmp_path / f"{name}.{split}.jsonl").read_text() == task.path(split).read_text()
    train, test = task.load("train"), task.load("test")
    assert (len(train), len(test)) == (task.TRAIN, task.HELD_OUT)
    assert not {r["input"] for r in train} & {r["input"] for r in test}
    return train, test


def test_the_bundled_task_is_reproducible_and_its_rationales_compute_the_label(tmp_path):
    train, test = reproduced_splits(multistep, "multistep", tmp_path)
    for record in check_records(train + test, TaskSpec(**multistep.TASK)):
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", record["rationale"])
        assert len(steps) == 3
        for a, op, b, c in steps:
            assert eval(f"{a} {op} {b}") == int(c)  # noqa: S307 - digits and one operator
        assert steps[-1][3] == record["label"]


@pytest.mark.parametrize("task", [kinds, shared_traits], ids=["kinds", "shared_traits"])
def test_a_creatures_task_is_reproducible_and_its_held_out_creatures_are_known_only_through_rationales(
    task, tmp_path
):
    train, test = reproduced_splits(task, task.__name__.rsplit(".", 1)[1], tmp_path)
    spec = TaskSpec(**task.TASK)
    kind_of: dict[str, str] = {}
    for record in check_records(train + test, spec):
        name, kind = re.fullmatch(r"A (\w+) is an? (\w+)\. .*", record["rationale"]).groups()
        assert name in record["input"] and kind not in record["input"]
        assert kind_of.setdefault(name, kind) == kind and record["label"] in task.KINDS[kind]
        assert record["rationale"].endswith(f" {record['label']}.")
    held_out = [r["rationale"].split()[1] for r in test]
    assert len(set(held_out)) == task.HELD_OUT
    trained = [r["rationale"].split()[1] for r in train]
    for name in held_out:  # the creature's three other traits are all asked in training
        assert trained.count(name) == len(kinds.TRAITS) - 1


def test_in_shared_traits_one_label_says_nothing_of_another_trait_and_two_name_the_kind():
    table = list(shared_traits.KINDS.values())
    for value in shared_traits.LABELS:
        assert sum(value in values for values in table) == 4
    for known, other in itertools.permutations(range(4), 2):
        for value in {values[known] for values in table}:
            others = Counter(values[other] for values in table if values[known] == value)
            narrowed = {known, other} == {2, 3}  # covered-in and moves-by narrow each other to two values
            assert sorted(others.values()) == ([2, 2] if narrowed else [1, 1, 1, 1])
    for first, second in itertools.combinations(range(4), 2):
        pairs = Counter((values[first], values[second]) for values in table)
        assert max(pairs.values()) == (2 if (first, second) == (2, 3) else 1)


def test_a_tokenizer_that_cannot_spell_the_prefixes_is_refused():
    with pytest.raises(DataError, match=r"cannot spell '\[label\]'"):
        check_tokenizer(character_tokenizer(), [])
    check_tokenizer(distill_tokenizer(), [{"input": "3 * 4 = ?", "label": "12", "rationale": "3 * 4 = 12."}])


def test_the_multitask_loss_is_label_loss_plus_lambda_times_rationale_loss():
    tokenizer = distill_tokenizer()
    torch.manual_seed(0)
    model = make_tiny_llama_in_memory()
    records = [("tom has 3 and 4", "7", "3 + 4 = 7."), ("ann has 5 and 1", "6", "5 + 1 = 6.")]
    labels = [encode_task(tokenizer, LABEL_PREFIX, x, y) for x, y, _ in records]
    rationales = [encode_task(tokenizer, RATIONALE_PREFIX, x, r) for x, _, r in records]
    loss_fn = multitask_loss(prefix_ids(tokenizer, RATIONALE_PREFIX), 0.5)
    with torch.no_grad():
        mixed = float(loss_fn(model, collate([labels[0], rationales[0], labels[1], rationales[1]])))
        label_loss = float(causal_lm_loss(model, collate(labels)))
        rationale_loss = float(causal_lm_loss(model, collate(rationales)))
        only_labels = float(loss_fn(model, collate(labels)))
    assert mixed == pytest.approx(label_loss + 0.5 * rationale_loss, rel=1e-5)
    assert only_labels == pytest.approx(label_loss, rel=1e-5)


def make_tiny_llama_in_memory() -> LlamaForCausalLM:
    from tests.tiny_models import tiny_llama_config

    return LlamaForCausalLM(tiny_llama_config(vocab_size=DISTILL_VOCAB_SIZE)).eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_student_trained_on_a_gpu_is_scored_there():
    records = kinds.load("train")[:8]
    options = DistillOptions(steps=2, batch_size=4, lr=1e-3, max_length=96, seed=0)
    model, _ = train_student(
        make_tiny_llama_in_memory(), distill_tokenizer(), records, options, rationales=True
    )
    assert next(model.parameters()).device.type == "cuda"
    score = label_accuracy(model, distill_tokenizer(), TaskSpec(**kinds.TASK), records[:4], 4)
    assert score["examples"] == 4


def test_the_cache_answers_a_retry_without_asking_and_a_failure_says_what_was_cached(tmp_path):
    prompts = [f"q{i}" for i in range(5)]
    asked: list[str] = []

    def flaky(batch: list[str]) -> list[str]:
        asked.extend(batch)
        if "q4" in batch:
            raise TeacherError("the teacher endpoint failed 5 times (last: HTTP 503)")
        return [f"answer to {p}" for p in batch]

    cache = AnswerCache(tmp_path / "cache.jsonl")
    with pytest.raises(TeacherError, match="4 of 5 teacher answers are cached"):
        ask_teacher(prompts, flaky, cache, "t", batch_size=2)
    asked.clear()
    again = AnswerCache(tmp_path / "cache.jsonl")  # a retried job reads the file afresh
    answers, cached = ask_teacher(prompts, lambda b: [f"late {p}" for p in b], again, "t", batch_size=2)
    assert cached == 4 and answers[:4] == [f"answer to q{i}" for i in range(4)] and answers[4] == "late q4"
    assert ask_teacher(prompts, lambda b: 1 / 0, AnswerCache(tmp_path / "cache.jsonl"), "t")[1] == 5
    assert ask_teacher(prompts[:1], lambda b: ["other"], again, "another teacher")[0] == ["other"]


def _answer(route: str, call: int, query: str) -> str | None:
    """/ok/v1 answers every query, /flaky/v1 fails twice per query before answering, /down/v1 is 503."""
    if route == "down" or (route == "flaky" and call % 3):
        return None
    return f"Reasoning: thinking about {query.split(chr(10))[0][:10]}.\nAnswer: 42"


@pytest.fixture(scope="module")
def teacher():
    with teacher_endpoint(_answer) as served:
        yield served


def test_an_endpoint_teacher_retries_with_backoff_then_answers_or_fails_with_the_reason(teacher):
    prompt = teacher_prompt(SHORT, demonstrations_for(SHORT, None, []), "what is 6 * 7?")
    flaky = endpoint_teacher(
        TeacherEndpoint(url=f"{teacher.url}/flaky/v1"), "m", 32, retries=3, backoff_s=0.01
    )
    assert parse_answer(SHORT, flaky([prompt])[0]) == ("thinking about what is 6 .", "42")
    down = endpoint_teacher(TeacherEndpoint(url=f"{teacher.url}/down/v1"), "m", 32, retries=2, backoff_s=0.01)
    before = teacher.calls.get("down", 0)
    with pytest.raises(TeacherError, match=r"failed 3 times \(last: HTTP 503\)"):
        down([prompt])
    assert teacher.calls["down"] - before == 3


def test_endpoints_come_from_the_settings_and_their_host_must_be_allowed():
    endpoints = {
        "local": TeacherEndpoint(url="http://127.0.0.1:9/v1"),
        "far": TeacherEndpoint(url="https://x.example/v1"),
    }
    assert endpoint_for("local", endpoints, ["127.0.0.1"]).url.endswith(":9/v1")
    with pytest.raises(ValueError, match="not on the allow-list"):
        endpoint_for("far", endpoints, ["127.0.0.1"])
    with pytest.raises(ValueError, match="not configured"):
        endpoint_for("http://evil", endpoints, ["evil"])


def test_distilling_trains_the_student_and_every_baseline_and_evaluates_them(tmp_path):
    make_tiny_llama(tmp_path / "student", seed=0, vocab_size=DISTILL_VOCAB_SIZE)
    tokenizer = distill_tokenizer()

    def load():
        return LlamaForCausalLM.from_pretrained(tmp_path / "student").eval(), tokenizer

    train = [{**r, "input": r["input"][:60]} for r in multistep.load("train")[:16]]
    train[0] = {"input": train[0]["input"], "label": train[0]["label"]}  # no rationale: not in step_by_step
    test = multistep.load("test")[:4]
    options = DistillOptions(
        steps=6, batch_size=4, lr=3e-3, max_length=96, baselines=["label_only", "distill_labels"]
    )
    phases: list[str] = []
    result = distill_step_by_step(
        load,
        train,
        test,
        SHORT,
        options,
        out_dir=tmp_path / "out",
        report=lambda p, d, t, m: phases.append(p),
    )
    assert set(result["eval"]) == {"step_by_step", "label_only", "distill_labels"}  # no teacher was queried
    assert all(0 <= v["accuracy"] <= 1 and v["examples"] == 4 for v in result["eval"].values())
    assert result["teacher_data"] == {"records": 16, "kept": 15, "no_rationale": 1}
    sbs, label_only = result["training"]["step_by_step"], result["training"]["label_only"]
    assert (sbs["label_rows"], sbs["rationale_rows"], label_only["label_rows"]) == (15, 15, 16)
    assert sbs["final_loss"] < sbs["first_loss"] and label_only["final_loss"] < label_only["first_loss"]
    assert (tmp_path / "out" / "config.json").is_file() and "evaluation" in phases
    with pytest.raises(DataError, match="no training records left"):
        distill_step_by_step(load, [{"input": "x", "label": "1"}], test, SHORT, options)
