"""Token constraints: what a request's next token may be (a grammar's allowed set), applied to its
logits before sampling and advanced with each token it samples.

A constraint lives with its request on the host (on the driver under tensor parallelism). Before
each step that samples the request's next token, the engine asks `allowed()` for the set as int32
bitmask words (token t allowed where bit t % 32 of word t // 32 is set: llguidance's layout), and
the step masks the logits with it (sampling.sample); after the step it calls `advance(token)`.
`allowed()` must not change the state: a step that is retried asks again."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class TokenConstraint(Protocol):
    def allowed(self) -> np.ndarray:
        """int32 [bitmask_words(vocab)]: the tokens that may come next."""

    def advance(self, token: int) -> None:
        """The request sampled `token` (one that allowed() allowed); ValueError if the constraint
        cannot take it."""
