"""Token constraints (runtime/constraints.py): a request's allowed-token bitmask masks its logits
before sampling, in prefill and decode, greedy and sampled, alone or batched with free requests
(which sample exactly as without it), across preemption; a constraint that refuses a token ends
its request alone."""
from unittest.mock import patch

import numpy as np
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime import decode_step
from pixtral_fast.runtime.sampling import bitmask_words, sample, unpack_bitmask
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded, Tokenizer
from tests.support.constraints import ForcedTokens, bitmask
from tests.support.engines import assert_clean

FORCED = [5000, 17, 123456, 900, 5000]


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 131072, 1000])
def test_unpack_bitmask_reads_bit_t_mod_32_of_word_t_div_32(vocab):
    rng = np.random.default_rng(vocab)
    allowed = [sorted(rng.choice(vocab, size=min(vocab, 7), replace=False).tolist()) for _ in range(3)]
    words = torch.from_numpy(np.stack([bitmask(a, vocab) for a in allowed]))
    assert words.shape == (3, bitmask_words(vocab)) and words.dtype == torch.int32
    got = unpack_bitmask(words, vocab)
    assert got.shape == (3, vocab)
    assert [torch.nonzero(row).flatten().tolist() for row in got] == allowed
    assert unpack_bitmask(torch.full((1, bitmask_words(vocab)), -1, dtype=torch.int32), vocab).all()


def test_sample_keeps_to_the_allowed_tokens():
    vocab, rows = 300, 64
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    allowed_sets = [[i % vocab, (7 * i + 3) % vocab, 299] for i in range(rows)]
    words = torch.from_numpy(np.stack([bitmask(a, vocab) for a in allowed_sets]))
    temperature = torch.tensor([0.0, 1.0] * (rows // 2))
    args = (temperature, torch.zeros(rows, dtype=torch.int64), torch.ones(rows), torch.arange(rows),
            torch.zeros(rows, dtype=torch.int64))
    tokens, finite = sample(logits, *args, allowed=words)
    assert finite.all() and all(t in a for t, a in zip(tokens.tolist(), allowed_sets))
    for i in range(0, rows, 2):  # greedy: the best allowed logit
        assert tokens[i] == max(allowed_sets[i], key=lambda t: logits[i, t])
    everything = torch.full_like(words, -1)
    assert torch.equal(sample(logits, *args, allowed=everything)[0], sample(logits, *args)[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    return model, Tokenizer.for_checkpoint(folder)


def request(i: int, n: int = 12) -> Encoded:
    return Encoded(tokens=[1] + [1000 + 13 * i + t for t in range(n - 1)], images=[])


def run(engine, requests, params, constraints):
    seqs = [engine.add_request(r, p, constraint=c) for r, p, c in zip(requests, params, constraints)]
    while engine.has_unfinished():
        engine.step()
    return seqs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_constrained_request_batched_with_free_ones(tiny, temperature):
    model, tok = tiny
    eos, vocab = tok.eos_id, model.args.text.vocab_size
    params = pf.SamplingParams(max_new_tokens=20, temperature=temperature, seed=3)
    engine = pf.Engine.from_model(model, tok, num_blocks=64, progress=False)
    alone = run(engine, [request(1), request(2)], [params] * 2, [None, None])
    forced = ForcedTokens(FORCED, eos, vocab)
    seqs = run(engine, [request(1), request(0), request(2)], [params] * 3, [None, forced, None])
    assert seqs[1].generated == FORCED + [eos] and seqs[1].finish_reason == "stop"
    assert forced.taken == FORCED + [eos]
    assert [s.generated for s in (seqs[0], seqs[2])] == [s.generated for s in alone]
    assert_clean(engine)


def test_free_steps_do_not_mask(tiny):
    model, tok = tiny
    engine = pf.Engine.from_model(model, tok, num_blocks=64, progress=False)
    masks = []
    real = decode_step.sample

    def recording(*args, allowed=None, **kwargs):
        masks.append(allowed is not None)
        return real(*args, allowed=allowed, **kwargs)

    with patch.object(decode_step, "sample", recording):
        run(engine, [request(1)], [pf.SamplingParams(max_new_tokens=4)], [None])
        assert masks == [False] * 3  # the first token comes from the prefill
        run(engine, [request(1)], [pf.SamplingParams(max_new_tokens=4)], [ForcedTokens(FORCED, tok.eos_id, 131072)])
        assert masks[3:] == [True] * 3


def test_a_preempted_constrained_request_keeps_its_place_in_the_grammar(tiny):
    model, tok = tiny
    eos, vocab = tok.eos_id, model.args.text.vocab_size
    engine = pf.Engine.from_model(model, tok, num_blocks=5, block_size=16, progress=False)  # 4 usable blocks
    long_forced = [2000 + i for i in range(30)]
    constraints = [ForcedTokens(long_forced, eos, vocab), ForcedTokens(long_forced[::-1], eos, vocab)]
    params = pf.SamplingParams(max_new_tokens=40, temperature=1.0, seed=1)
    seqs = run(engine, [request(0, 14), request(1, 14)], [params] * 2, constraints)
    assert engine.scheduler.preemptions > 0, "set-up: nothing was preempted"
    assert [s.generated for s in seqs] == [long_forced + [eos], long_forced[::-1] + [eos]]
    assert_clean(engine)


def test_a_constraint_that_refuses_ends_its_request_alone(tiny):
    model, tok = tiny
    engine = pf.Engine.from_model(model, tok, num_blocks=64, progress=False)

    class Refusing(ForcedTokens):
        def advance(self, token):
            if len(self.taken) == 2:
                raise ValueError("the grammar is in an error state")
            super().advance(token)

    params = pf.SamplingParams(max_new_tokens=8)
    seqs = run(engine, [request(0), request(1)], [params] * 2,
               [Refusing(FORCED, tok.eos_id, 131072), None])
    assert seqs[0].finish_reason == "error" and "the grammar is in an error state" in seqs[0].error
    assert seqs[0].generated == FORCED[:3] and seqs[1].finish_reason == "length"
    assert_clean(engine)
