"""Data domains for dynamic batch loading: each a token stream cut into train / dev / test windows
(`workers.train.dynamic_batches.split_domain`).

A domain is a bundled text by name (`workers.early_exit.fit_data.BUNDLED`: "chat", "general", "everyday",
"prose", "broad"; origins in workers/data/README.md) or a JSONL file of the fine-tuning forms; its records are
rendered and tokenised as in fine-tuning and concatenated, the first `max_tokens` kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from workers.early_exit.fit_data import BUNDLED, bundled_records, fitting_ids
from workers.train.data import read_jsonl
from workers.train.dynamic_batches import Domain, split_domain

DEFAULT_DOMAINS: tuple[str, ...] = ("prose", "chat", "broad", "general", "everyday")


def load_domains(
    tokenizer,
    sources: Mapping[str, Path | None],
    seq_len: int,
    heldout_windows: int,
    max_tokens: int | None = None,
) -> list[Domain]:
    """One Domain per entry: name -> a JSONL path, or None for the bundled text of that name."""
    domains = []
    for name, path in sources.items():
        if path is None and name not in BUNDLED:
            raise ValueError(f"unknown domain {name!r}: give a file, or one of {', '.join(BUNDLED)}")
        records = read_jsonl(path) if path is not None else bundled_records(name)  # type: ignore[arg-type]
        ids: list[int] = []
        for record in records:  # one at a time: stop encoding at max_tokens
            ids.extend(fitting_ids(tokenizer, [record]))
            if max_tokens is not None and len(ids) >= max_tokens:
                ids = ids[:max_tokens]
                break
        domains.append(split_domain(name, ids, seq_len, heldout_windows))
    return domains
