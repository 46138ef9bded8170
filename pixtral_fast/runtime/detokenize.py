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
        self.prefix_text = ""   # decode(ids[prefix_start:read_start]), kept between calls

    def push(self, token: int) -> str:
        """Adds one token id; returns the text that is now complete (possibly '')."""
        self.ids.append(token)
        full = self.decode(self.ids[self.prefix_start:])
        if full.endswith(REPLACEMENT) or len(full) <= len(self.prefix_text):
            return ""
        piece = full[len(self.prefix_text):]
        self.prefix_start, self.read_start = self.read_start, len(self.ids)
        self.prefix_text = self.decode(self.ids[self.prefix_start:self.read_start])
        return piece

    def flush(self) -> str:
        """Whatever is still held back at the end of generation, incomplete characters included."""
        full = self.decode(self.ids[self.prefix_start:])
        piece = full[len(self.prefix_text):]
        self.prefix_start = self.read_start = len(self.ids)
        self.prefix_text = ""
        return piece
