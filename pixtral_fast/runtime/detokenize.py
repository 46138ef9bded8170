"""Incremental detokenization: text increments that never split a multi-byte character.

Tekken pieces are bytes, so one character can span several tokens. Each increment decodes a short
window (from the last two emitted boundaries to the end) and holds text back while the window
still ends in an incomplete character (decoded as U+FFFD).

A character has at most 4 bytes, so a longer held run (invalid bytes, which also decode as
U+FFFD, or tokens without text) is settled: released up to a boundary where decoding in two parts
gives the same text as decoding at once. The window stays short, and each token costs the same
however long the run (re-decoding a growing window made a run of n invalid bytes cost n**2)."""
from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"
MAX_HELD_TOKENS = 8     # past this many held ids, the held run is settled
SPLITS_TRIED = 4        # a held character ends within this many ids of the end
MAX_UNSETTLED_TOKENS = 32  # held this long with no boundary verified (ids without text): release all


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
            return self._settle(full) if len(self.ids) - self.read_start > MAX_HELD_TOKENS else ""
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

    def _settle(self, full: str) -> str:
        """A long held run: the text before the last boundary that decoding does not see (it
        splits no character). Past MAX_UNSETTLED_TOKENS with none found, all of it: only ids that
        decode to no text (and do not break the byte stream, as Tekken's special tokens do) between
        the bytes of one character could then show it as U+FFFD rather than whole."""
        for split in range(len(self.ids) - 1, max(self.read_start, len(self.ids) - SPLITS_TRIED - 1), -1):
            tail = self.decode(self.ids[split:])
            if not tail:
                continue  # the ids after the split add no text: nothing shows the split is safe
            head = self.decode(self.ids[self.prefix_start:split])
            if full == head + tail:
                self.prefix_start = self.read_start = split
                piece, self.prefix_text = head[len(self.prefix_text):], ""
                return piece
        if len(self.ids) - self.read_start > MAX_UNSETTLED_TOKENS:
            return self.flush()
        return ""
