"""The held-out texts exits are scored on, by name; none is ever fitted on.

- "heldout": workers/data/heldout.txt, everyday prose written for the project (the profile's text until the
  broad corpus came);
- "heldout_prose": workers/data/heldout_prose.txt, six pieces of prose in the registers of prose.jsonl;
- one per source of the broad corpus (workers/data/broad_heldout.jsonl, `bench/build_corpus.py`): the held-out
  split of each fitting source ("gnu-manuals", "vim-manual", "python-reference", "python-docstrings",
  "legal") and the out-of-domain sources no fitting text comes from ("dpkg-spec", a technical
  specification);
- "broad": the broad held-out, a piece of each broad source in turn, out-of-domain sources first, so that
  its first tokens already span every register: a profile's default evaluation text (`DEFAULT_EVAL_TEXT`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from itertools import chain, zip_longest

from workers.eval.texts import bundled_text

DEFAULT_EVAL_TEXT = "broad"


@dataclass(frozen=True)
class HeldoutText:
    name: str
    text: str
    register: str
    out_of_domain: bool  # no fitting text of the bundled default comes from its source


@cache
def heldout_texts() -> dict[str, HeldoutText]:
    """Every bundled held-out text by name (see the module's docstring), out-of-domain ones flagged."""
    rows = [json.loads(line) for line in bundled_text("broad_heldout.jsonl").splitlines() if line.strip()]
    pieces: dict[str, list[str]] = {}
    meta: dict[str, tuple[str, bool]] = {}
    for row in rows:
        pieces.setdefault(row["source"], []).append(row["text"])
        meta[row["source"]] = (row["register"], bool(row.get("out_of_domain")))
    texts = {
        "heldout": HeldoutText("heldout", bundled_text("heldout.txt"), "everyday prose (project)", False),
        "heldout_prose": HeldoutText(
            "heldout_prose", bundled_text("heldout_prose.txt"), "prose in six registers (project)", False
        ),
    }
    for source, parts in pieces.items():
        texts[source] = HeldoutText(source, "\n\n".join(parts), *meta[source])
    order = sorted(pieces, key=lambda source: not meta[source][1])  # out-of-domain first
    mixed = [p for p in chain.from_iterable(zip_longest(*(pieces[s] for s in order))) if p is not None]
    texts[DEFAULT_EVAL_TEXT] = HeldoutText(DEFAULT_EVAL_TEXT, "\n\n".join(mixed), "every broad source", True)
    return texts
