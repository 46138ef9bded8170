"""Admission exactly at each bound, one token either side: the KV cache's capacity and
max_model_len. A prompt past a bound is refused with a message naming it; one within runs to its
length limit with exactly the tokens that fit."""
import pytest

from pixtral_fast.runtime.scheduler import Sequence
from tests.support.engines import assert_clean, model, new_engine, tiny_dir, tok  # noqa: F401  (fixtures)
from tests.support.token_prompts import prompt, run


def assert_ran_or_refused(seq: Sequence, tokens: int | None, refusal: str) -> None:
    """tokens None: refused with exactly `refusal`; else ran to "length" with that many tokens."""
    if tokens is None:
        assert (seq.finish_reason, seq.generated, seq.error) == ("error", [], refusal)
    else:
        assert (seq.finish_reason, len(seq.generated), seq.error) == ("length", tokens, None)


@pytest.mark.parametrize("n, tokens", [(46, 3), (47, 2), (48, None), (49, None)])
def test_the_cache_capacity_bound(model, tok, n, tokens):
    """A 48-token cache (3 usable blocks of 16): a prompt needs n + 1 slots to give a token, so 48
    is refused, and 47 runs until its cache is full (48 tokens cached, one more sampled from them)."""
    eng = new_engine(model, tok, num_blocks=4)
    assert eng.blocks.capacity_tokens == 48
    (seq,) = run(eng, prompt(n))
    assert_ran_or_refused(seq, tokens, f"the prompt needs room for {n + 1} tokens but the whole KV cache holds "
                                       "48; it can never run with this cache")
    assert_clean(eng)


@pytest.mark.parametrize("n, tokens", [(14, 2), (15, 1), (16, None), (17, None)])
def test_the_max_model_len_bound(model, tok, n, tokens):
    """max_model_len=16 holds the prompt and what it generates: 15 prompt tokens give exactly
    one, 16 are refused."""
    eng = new_engine(model, tok, max_model_len=16)
    (seq,) = run(eng, prompt(n))
    assert_ran_or_refused(seq, tokens, f"the prompt has {n} tokens; max_model_len is 16 (the prompt and at "
                                       "least one new token must fit)")
    assert seq.finished and (tokens is None or len(seq.tokens) == 16)
    assert_clean(eng)
