"""A token constraint for tests: the next token is forced (a list of ids, then EOS), as a grammar
with a single path would force it; it records what it was asked and given."""
from __future__ import annotations

import numpy as np

from pixtral_fast.runtime.sampling import bitmask_words


def bitmask(tokens, vocab: int) -> np.ndarray:
    words = np.zeros(bitmask_words(vocab), dtype=np.uint32)
    for t in tokens:
        words[t // 32] |= np.uint32(1 << (t % 32))
    return words.view(np.int32)


class ForcedTokens:
    def __init__(self, tokens: list[int], eos: int, vocab: int):
        self.tokens, self.eos, self.vocab, self.taken = list(tokens), eos, vocab, []

    def next_token(self) -> int:
        return self.tokens[len(self.taken)] if len(self.taken) < len(self.tokens) else self.eos

    def allowed(self) -> np.ndarray:
        return bitmask([self.next_token()], self.vocab)

    def advance(self, token: int) -> None:
        if token != self.next_token():
            raise ValueError(f"token {token} is not the forced {self.next_token()}")
        self.taken.append(token)
