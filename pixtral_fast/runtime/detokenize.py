"""Incremental detokenization: text increments that never split a multi-byte character.

Tekken pieces are bytes, so one character can span several tokens. Each increment decodes a short
window (from the last two emitted boundaries to the end) and holds text back while the window
still ends in an incomplete character (decoded as U+FFFD)."""
from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix_start = 0   # window start: the window re-decodes from here for context
        self.read_start = 0     # ids before this are already emitted

    def push(self, token: int) -> str:
        """Adds one token id; returns the text that is now complete (possibly '')."""
        self.ids.append(token)
        prefix = self.decode(self.ids[self.prefix_start:self.read_start])
        full = self.decode(self.ids[self.prefix_start:])
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return ""
        self.prefix_start, self.read_start = self.read_start, len(self.ids)
        return full[len(prefix):]
