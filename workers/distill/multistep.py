"""The bundled task for distilling step-by-step: multi-step arithmetic word problems whose rationale is
the worked steps.

Each record is `{"input", "label", "rationale"}`: a purchase in equal bags (a product) and a gift or a
find (a sum or difference) applied to a starting count, e.g.

    input:     Maria has 7 apples. She buys 3 bags with 4 apples in each, then gives away 5. How many
               apples does Maria have now?
    rationale: 3 bags of 4 apples is 3 * 4 = 12. 7 + 12 = 19. 19 - 5 = 14.
    label:     14

Answering needs three operations in order, which the rationale spells out and the label alone does not.
The files under workers/data/tasks/ (multistep.train.jsonl, multistep.test.jsonl) are written by
`python -m workers.distill.multistep` from the word lists of workers/tasks.py with a fixed seed; nothing
is downloaded. Scored as a short answer (numeric exact match).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from workers.tasks import ITEMS, NAMES, read_split, split_file, write_splits

SEED = 29
TRAIN, HELD_OUT = 400, 60
TASK = {"type": "short_answer"}


def problem(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, bags, each = rng.randint(2, 20), rng.randint(2, 5), rng.randint(2, 5)
    product = bags * each
    buy = f"buys {bags} bags with {each} {item} in each"
    first = f"{bags} bags of {each} {item} is {bags} * {each} = {product}."
    if rng.random() < 0.5:
        d = rng.randint(1, min(10, a + product - 1))
        total = a + product
        answer = total - d
        text = f"{name} has {a} {item}. {name} {buy}, then gives away {d}."
        steps = f"{first} {a} + {product} = {total}. {total} - {d} = {answer}."
    else:
        d = rng.randint(1, 10)
        total = a + d
        answer = total + product
        text = f"{name} has {a} {item} and finds {d} more. Then {name} {buy}."
        steps = f"{a} + {d} = {total}. {first} {total} + {product} = {answer}."
    question = f"{text} How many {item} does {name} have now?"
    return {"input": question, "label": str(answer), "rationale": steps}


def generate(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """{"train": [...], "test": [...]}: distinct inputs, none in both splits, in a seeded order."""
    rng = random.Random(f"multistep:{seed}")
    found: dict[str, dict[str, str]] = {}
    for _ in range(100 * (TRAIN + HELD_OUT)):
        record = problem(rng)
        found.setdefault(record["input"], record)
        if len(found) == TRAIN + HELD_OUT:
            break
    records = list(found.values())
    return {"test": records[:HELD_OUT], "train": records[HELD_OUT:]}


def path(split: str) -> Path:
    return split_file("multistep", split)


def load(split: str) -> list[dict[str, Any]]:
    return read_split(path(split))


def write(directory: Path | None = None) -> list[Path]:
    return write_splits("multistep", generate(), directory)


if __name__ == "__main__":
    for written in write():
        print(written)
