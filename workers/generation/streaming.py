"""Incremental detokenisation with stop strings, for streaming one request's output.

After each token the generated ids are decoded to text s. If a stop string occurs in s at its earliest
position i, the output is s[:i] and generation ends. Otherwise the text that may be streamed is s without
its longest suffix that could still grow into a stop string (or an incomplete UTF-8 character, shown as
U+FFFD), so text once streamed is never taken back.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"


def earliest_stop(text: str, stops: Sequence[str]) -> int | None:
    """min over stop strings s of text.find(s), or None when no stop string occurs."""
    found = [index for index in (text.find(stop) for stop in stops if stop) if index >= 0]
    return min(found) if found else None


def unsafe_tail(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string, or is U+FFFD."""
    held = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), held, -1):
            if stop.startswith(text[len(text) - length :]):
                held = length
                break
    if text.endswith(REPLACEMENT_CHAR):
        held = max(held, len(text) - len(text.rstrip(REPLACEMENT_CHAR)))
    return held


class TextStream:
    """Turns a growing list of token ids into text deltas, honouring stop strings.

    `push(token_id)` returns (delta, stopped); `finish()` returns the held-back remainder; `text` is the
    final output (truncated before the stop string when one matched).
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [stop for stop in stops if stop]
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return the newly streamable text and whether a stop string matched."""
        self.token_ids.append(token_id)
        decoded = self._decode()
        stop_at = earliest_stop(decoded, self.stops)
        if stop_at is not None:
            self.text, self.stopped = decoded[:stop_at], True
            return self._advance(len(self.text)), True
        self.text = decoded
        return self._advance(len(decoded) - unsafe_tail(decoded, self.stops)), False

    def finish(self) -> str:
        """The text still held back, released at the end of generation (no stop string can follow)."""
        return self._advance(len(self.text))

    def _advance(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : end], end
        return delta
