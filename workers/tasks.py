"""Bundled fine-tuning tasks: three generated domains, each with train and held-out splits and a scorer.

- `arithmetic`: word problems (add or take away, numbers up to 20) answered with the number alone.
- `topic`: a sentence's topic from a fixed label set (sports, food, weather, music, travel), one word.
- `extract`: a sentence about a purchase turned into one line of JSON with keys name, item, count.

Every record is a chat record ({"messages": [user, assistant]}); the assistant turn is the reference the
scorer compares a model's reply with. The files under workers/data/tasks/ are written by
`python -m workers.tasks` from word lists in this module with a fixed seed (nothing is downloaded); a test
checks that the files equal a fresh generation. Origin and sizes: workers/data/tasks/TASKS.md.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

SEED = 28
TRAIN, HELD_OUT = 400, 60
NAMES = ["Maria", "Tom", "Aisha", "Ken", "Lena", "Omar", "Sofia", "Ravi", "Greta", "Jonas", "Mei", "Pablo"]
ITEMS = ["apples", "pears", "books", "pencils", "cards", "stamps", "shells", "coins", "marbles", "cookies"]
LABELS = ("sports", "food", "weather", "music", "travel")
TOPIC_WORDS = {
    "sports": (
        ["the striker", "our team", "the goalkeeper", "the coach", "the runner", "the tennis player"],
        [
            "scored twice in the second half",
            "won the final on penalties",
            "trained hard before the match",
            "broke the club record",
            "lost the race by a second",
            "signed a new contract with the club",
        ],
    ),
    "food": (
        ["the soup", "my grandmother's bread", "the new bakery", "this curry", "the pasta", "the salad"],
        [
            "needs more salt and pepper",
            "was baked with fresh butter",
            "tastes of garlic and lemon",
            "is served with rice",
            "was cooked slowly for hours",
            "had too much cheese on top",
        ],
    ),
    "weather": (
        ["tomorrow morning", "the weekend", "tonight", "the coast", "the north", "this afternoon"],
        [
            "will bring heavy rain and wind",
            "should be sunny and warm",
            "may see snow on the hills",
            "will be foggy until noon",
            "brings a chance of thunderstorms",
            "will stay cold and cloudy",
        ],
    ),
    "music": (
        ["the band", "the orchestra", "the singer", "her new album", "the guitarist", "the choir"],
        [
            "played a quiet song in a minor key",
            "released a record of piano ballads",
            "toured with a new drummer",
            "sang the chorus twice",
            "tuned the strings before the concert",
            "recorded the melody in one take",
        ],
    ),
    "travel": (
        ["our flight", "the train to Rome", "the hotel", "the ferry", "my passport", "the road trip"],
        [
            "was delayed at the airport",
            "left the station on time",
            "had a view of the harbour",
            "crossed to the island at dawn",
            "needs a new visa stamp",
            "took us through three countries",
        ],
    ),
}
LEAD_INS = ["", "I heard that ", "Apparently ", "Everyone says ", "It seems "]
EXTRACT_TEMPLATES = [
    "{name} bought {count} {item} at the market.",
    "At the shop, {name} picked up {count} {item}.",
    "Yesterday {name} purchased {count} {item} for a friend.",
    "{name} came home with {count} {item}.",
]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 20), rng.randint(1, 20)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        answer = a + b
    else:
        a, b = max(a, b), min(a, b)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        answer = a - b
    return f"{question} Answer with the number only.", str(answer)


def _topic(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(LABELS)
    subjects, predicates = TOPIC_WORDS[label]
    sentence = f"{rng.choice(LEAD_INS)}{rng.choice(subjects)} {rng.choice(predicates)}."
    sentence = sentence[0].upper() + sentence[1:]
    prompt = f"Classify the topic of this sentence as one of: {', '.join(LABELS)}.\nSentence: {sentence}"
    return prompt, label


def _extract(rng: random.Random) -> tuple[str, str]:
    name, item, count = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(1, 30)
    sentence = rng.choice(EXTRACT_TEMPLATES).format(name=name, count=count, item=item)
    prompt = f"Turn this sentence into JSON with the keys name, item and count.\nSentence: {sentence}"
    return prompt, json.dumps({"name": name, "item": item, "count": count})


def _first_int(reply: str) -> int | None:
    found = re.search(r"-?\d+", reply)
    return int(found.group()) if found else None


def _score_arithmetic(reply: str, reference: str) -> bool:
    return _first_int(reply) == int(reference)


def _score_topic(reply: str, reference: str) -> bool:
    words = re.findall(r"[a-z]+", reply.lower())
    return bool(words) and words[0] == reference


def _score_extract(reply: str, reference: str) -> bool:
    found = re.search(r"\{.*?\}", reply, re.S)
    try:
        return found is not None and json.loads(found.group()) == json.loads(reference)
    except json.JSONDecodeError:
        return False


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "topic": _topic,
    "extract": _extract,
}
SCORERS: dict[str, Callable[[str, str], bool]] = {
    "arithmetic": _score_arithmetic,
    "topic": _score_topic,
    "extract": _score_extract,
}
MAX_NEW_TOKENS = {"arithmetic": 6, "topic": 4, "extract": 32}
TASKS = tuple(GENERATORS)


def generate(task: str, seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """{"train": [...], "test": [...]}: distinct prompts, none in both splits, in a seeded order."""
    rng = random.Random(f"{task}:{seed}")
    pairs: dict[str, str] = {}
    for _ in range(100 * (TRAIN + HELD_OUT)):
        prompt, answer = GENERATORS[task](rng)
        pairs.setdefault(prompt, answer)
        if len(pairs) == TRAIN + HELD_OUT:
            break
    records = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for p, a in pairs.items()
    ]
    return {"test": records[:HELD_OUT], "train": records[HELD_OUT:]}


def tasks_dir() -> Path:
    return Path(str(files("workers").joinpath("data", "tasks")))


SPLITS = ("train", "test")


def split_file(name: str, split: str, directory: Path | None = None) -> Path:
    """`<name>.<split>.jsonl` in `directory` (by default workers/data/tasks/): the file of one split of a
    bundled task, these chat tasks or the distillation tasks of workers/distill."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    return (directory or tasks_dir()) / f"{name}.{split}.jsonl"


def read_split(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def write_splits(
    name: str, splits: Mapping[str, Sequence[Mapping[str, Any]]], directory: Path | None = None
) -> list[Path]:
    """Each split's records to its file (in `directory`, by default the bundled tasks'), in order."""
    written = []
    for split, records in splits.items():
        target = split_file(name, split, directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        written.append(target)
    return written


def task_path(task: str, split: str) -> Path:
    if task not in GENERATORS or split not in SPLITS:
        raise ValueError(f"unknown task or split: {task!r} {split!r} (tasks: {', '.join(TASKS)})")
    return split_file(task, split)


def load(task: str, split: str) -> list[dict[str, Any]]:
    return read_split(task_path(task, split))


def prompt_and_reference(record: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """The conversation up to the last assistant turn, and that turn's content."""
    messages = record["messages"]
    return messages[:-1], messages[-1]["content"]


def score(task: str, replies: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of replies the task's scorer accepts."""
    if len(replies) != len(references) or not replies:
        raise ValueError("one reply per reference, at least one")
    return sum(SCORERS[task](r, ref) for r, ref in zip(replies, references, strict=True)) / len(replies)


def replies(
    model, tokenizer, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy replies (chat template, generation prompt) from Strata's batched engine, each ending at EOS."""
    return _engine_replies(model, tokenizer, [(c, max_new_tokens) for c in conversations], batch_size)


def _engine_replies(
    model, tokenizer, jobs: Sequence[tuple[list[dict[str, str]], int]], batch_size: int
) -> list[str]:
    """Greedy replies to (conversation, max_new_tokens) pairs in one engine run: the engine batches prompts
    of similar length and drops each row at its EOS; in float32 its greedy tokens equal HF generate's
    (tests/generation/test_engine_greedy.py)."""
    from workers.early_exit.forward import num_layers
    from workers.generation.engine import EarlyExitEngine, GenerationRequest

    engine = EarlyExitEngine(model, tokenizer, max_batch_size=batch_size)
    depth = num_layers(model)
    requests = []
    for conversation, max_new_tokens in jobs:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        requests.append(GenerationRequest(prompt_ids=ids, depth=depth, max_new_tokens=max_new_tokens))
    return [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in engine.run(requests)]


def evaluate(model, tokenizer, task: str, limit: int | None = None, batch_size: int = 32) -> float:
    """The model's score on the task's held-out split (the first `limit` records)."""
    return evaluate_tasks(model, tokenizer, [task], limit, batch_size)[task]


def evaluate_tasks(
    model, tokenizer, names: Sequence[str], limit: int | None = None, batch_size: int = 32
) -> dict[str, float]:
    """The model's score on each task's held-out split (the first `limit` records), all prompts of all
    tasks decoded in one engine run, each task with its own `MAX_NEW_TOKENS`."""
    pairs = {t: [prompt_and_reference(r) for r in load(t, "test")[:limit]] for t in names}
    jobs = [(prompt, MAX_NEW_TOKENS[t]) for t in names for prompt, _ in pairs[t]]
    got = iter(_engine_replies(model, tokenizer, jobs, batch_size))
    return {t: score(t, [next(got) for _ in pairs[t]], [ref for _, ref in pairs[t]]) for t in names}


def write_all(directory: Path | None = None) -> list[Path]:
    return [path for task in TASKS for path in write_splits(task, generate(task), directory)]


if __name__ == "__main__":
    for path in write_all():
        print(path)
