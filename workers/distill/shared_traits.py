"""The third bundled task for distilling step-by-step: traits of invented creatures whose trait values are
shared between kinds, so that a creature's labels do not give its kind away and its rationales do.

Sixteen invented kinds, numbered by (x, y) in Z4 x Z4, and four traits of four values each:

    eats       EATS[x]            covered in  COVERS[(x + y) mod 4]
    lives in   HOMES[y]           moves by    MOVES[(x + 3y) mod 4]

so every value belongs to four kinds, and one trait's value says nothing about another's: given it, each
value of another trait is equally likely (covered-in and moves-by excepted, which narrow each other to two
values). A record asks one trait of one creature:

    input:     What does a pleezpak eat?
    rationale: A pleezpak is a vantle. A vantle eats seeds.
    label:     seeds

A held-out record asks one trait of a creature whose three other traits are asked in the training split.
A student that knows the creature's kind (stated in every rationale about it) looks the answer up; a
label-only student has the creature's other values, which determine the kind only through the modular
relations above (any two of them do, except covered-in and moves-by together, which leave two kinds), a
rule it must discover from the co-occurrence of values across hundreds of creatures. That is the paper's
setting in miniature: the rationales carry knowledge the labels do not make easy to get. Unlike `kinds`
(workers/distill/kinds.py), where every value belongs to one kind and a single label names the kind, so a
student that gives every creature one token learns the kinds from the labels alone
(docs/distill-step-by-step.md).

The files under workers/data/tasks/ (shared_traits.train.jsonl, shared_traits.test.jsonl) are written by
`python -m workers.distill.shared_traits` with a fixed seed; nothing is downloaded. Scored as
classification over the 16 trait values (chance: 1 in 4 for a value of the asked trait).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from workers.distill.kinds import split_creatures
from workers.tasks import read_split, split_file, write_splits

SEED = 29
CREATURES_PER_KIND = 30
TRAIN, HELD_OUT = 1600, 60

EATS = ("seeds", "grass", "flies", "moss")
HOMES = ("nests", "rivers", "burrows", "ponds")
COVERS = ("feathers", "scales", "fur", "shells")
MOVES = ("flying", "swimming", "hopping", "walking")
# sixteen invented kind names (none an English word, none a creature name the generator can make)
KIND_NAMES = (
    "vantle", "crommet", "pilsa", "yarrok", "hobbin", "wexel", "quorl", "dunnet",
    "ferrow", "jassik", "gorrim", "tulver", "cazzle", "sombrel", "rinnek", "yuffin",
)  # fmt: skip


def traits(x: int, y: int) -> tuple[str, str, str, str]:
    """The values of kind (x, y): eats, lives in, covered in, moves by (the order of kinds.TRAITS)."""
    return EATS[x], HOMES[y], COVERS[(x + y) % 4], MOVES[(x + 3 * y) % 4]


KINDS: dict[str, tuple[str, str, str, str]] = {
    KIND_NAMES[4 * x + y]: traits(x, y) for x in range(4) for y in range(4)
}
LABELS = sorted({value for values in KINDS.values() for value in values})
TASK = {"type": "classification", "labels": LABELS}


def generate(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    rng = random.Random(f"shared_traits:{seed}")
    return split_creatures(rng, KINDS, CREATURES_PER_KIND, TRAIN, HELD_OUT)


def path(split: str) -> Path:
    return split_file("shared_traits", split)


def load(split: str) -> list[dict[str, Any]]:
    return read_split(path(split))


def write(directory: Path | None = None) -> list[Path]:
    return write_splits("shared_traits", generate(), directory)


if __name__ == "__main__":
    for written in write():
        print(written)
