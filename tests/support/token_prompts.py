"""Token-only requests for engine tests: a prompt of n tokens, a stop token the tiny model never
samples (so a request runs to its length limit), and running requests to their end."""
from __future__ import annotations

from pixtral_fast.runtime.sampling import SamplingParams
from pixtral_fast.runtime.scheduler import Sequence
from pixtral_fast.tokenizer import Encoded

NEVER = (0,)     # <unk> as the only stop token: never sampled by the tiny model here


def prompt(n: int, first: int = 1000) -> Encoded:
    return Encoded(tokens=[1] + [first + i % 7 for i in range(n - 1)], images=[])


def run(eng, *requests: Encoded, max_new_tokens: int = 100) -> list[Sequence]:
    seqs = [eng.add_request(r, SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=NEVER)) for r in requests]
    while eng.has_unfinished():
        eng.step()
    return seqs
