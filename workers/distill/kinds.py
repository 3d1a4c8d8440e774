"""The second bundled task for distilling step-by-step: traits of invented creatures, where the rationale
carries the knowledge the label leaves out.

Each creature has an invented name and one of eight kinds; each kind has one value for each of four
traits (what it eats, where it lives, what covers it, how it moves). A record asks one trait of one
creature:

    input:     What does a blorvik eat?
    rationale: A blorvik is a bird. A bird eats seeds.
    label:     seeds

The label alone says only that a blorvik eats seeds; the rationale also says that a blorvik is a bird,
which answers its three other traits. The held-out records ask a trait of a creature whose other traits
are in the training split (its kind is never stated in a held-out input), so a student answers them by
knowing the creature's kind: stated outright in every rationale, left for a label-only student to infer
from the co-occurrence of trait values. This is the paper's setting in miniature (rationales carry
knowledge a teacher has and the labels do not), made so that a small student learns it on a CPU. No
pretrained model can know an invented creature, so the rationales are the generator's own (the issue's
"rationales already present in the data"); a teacher's few-shot accuracy on it is near chance.

The files under workers/data/tasks/ (kinds.train.jsonl, kinds.test.jsonl) are written by
`python -m workers.distill.kinds` with a fixed seed; nothing is downloaded. Scored as classification over
the 32 trait values.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from workers.tasks import read_split, split_file, write_splits

SEED = 29
CREATURES_PER_KIND = 15
TRAIN, HELD_OUT = 400, 60

# kind -> (eats, lives in, covered in, moves by); every column's eight values differ
KINDS: dict[str, tuple[str, str, str, str]] = {
    "bird": ("seeds", "nests", "feathers", "flying"),
    "carp": ("plankton", "rivers", "scales", "swimming"),
    "hare": ("grass", "burrows", "fur", "hopping"),
    "moth": ("nectar", "woods", "dust", "fluttering"),
    "tortoise": ("clover", "deserts", "shells", "walking"),
    "snail": ("moss", "gardens", "slime", "sliding"),
    "frog": ("flies", "ponds", "skin", "jumping"),
    "lamb": ("hay", "farms", "wool", "trotting"),
}
# trait -> (question about a creature, the rationale's second sentence about its kind)
TRAITS: tuple[tuple[str, str], ...] = (
    ("What does a {name} eat?", "A {kind} eats {value}."),
    ("Where does a {name} live?", "A {kind} lives in {value}."),
    ("What covers a {name}?", "A {kind} is covered in {value}."),
    ("How does a {name} move?", "A {kind} moves by {value}."),
)
LABELS = sorted({value for values in KINDS.values() for value in values})
TASK = {"type": "classification", "labels": LABELS}

_ONSETS = ("b", "bl", "br", "d", "dr", "f", "fl", "g", "gl", "gr", "k", "kl", "m", "n", "p", "pl", "s", "sk")
_ONSETS += ("sn", "t", "tr", "v", "z", "zw")
_VOWELS = ("a", "e", "i", "o", "u", "ee", "oo", "ai")
_CODAS = ("", "b", "k", "l", "m", "n", "p", "r", "sh", "t", "x", "z")


def invented_name(rng: random.Random) -> str:
    """Two syllables, e.g. "blorvik": pronounceable, and (with the fixed seed) no English word."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2))


def creatures(rng: random.Random, table: dict[str, tuple[str, ...]], per_kind: int) -> dict[str, str]:
    """name -> kind, `per_kind` of each kind of `table`, names distinct and none a kind's or a value's."""
    taken = set(table) | {value for values in table.values() for value in values}
    found: dict[str, str] = {}
    for kind in table:
        while sum(k == kind for k in found.values()) < per_kind:
            name = invented_name(rng)
            if name not in taken and name not in found:
                found[name] = kind
    return found


def record(name: str, kind: str, trait: int, table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    question, fact = TRAITS[trait]
    value = table[kind][trait]
    return {
        "input": question.format(name=name),
        "label": value,
        "rationale": f"A {name} is a {kind}. " + fact.format(kind=kind, value=value),
    }


def split_creatures(
    rng: random.Random, table: dict[str, tuple[str, ...]], per_kind: int, train: int, held_out: int
) -> dict[str, list[dict[str, str]]]:
    """{"train": [...], "test": [...]} over `per_kind` invented creatures of each kind of `table`: the
    held-out records ask one trait each of `held_out` distinct creatures whose other traits are all asked
    in the training split; the training split is the rest, minus what is over `train`, in a seeded order."""
    found = creatures(rng, table, per_kind)
    names = sorted(found)
    rng.shuffle(names)
    held = {name: rng.randrange(len(TRAITS)) for name in names[:held_out]}
    test = [record(name, found[name], trait, table) for name, trait in held.items()]
    rest = [(n, t) for n in names for t in range(len(TRAITS)) if held.get(n) != t]
    protected = [(n, t) for n, t in rest if n in held]
    others = [(n, t) for n, t in rest if n not in held]
    rng.shuffle(others)
    pairs = protected + others[: train - len(protected)]
    rng.shuffle(pairs)
    return {"test": test, "train": [record(n, found[n], t, table) for n, t in pairs]}


def generate(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    return split_creatures(random.Random(f"kinds:{seed}"), KINDS, CREATURES_PER_KIND, TRAIN, HELD_OUT)


def path(split: str) -> Path:
    return split_file("kinds", split)


def load(split: str) -> list[dict[str, Any]]:
    return read_split(path(split))


def write(directory: Path | None = None) -> list[Path]:
    return write_splits("kinds", generate(), directory)


if __name__ == "__main__":
    for written in write():
        print(written)
