"""A token constraint under tensor parallelism: the bitmask travels with the step's rows to every
rank, and the constrained request follows it exactly while a free one decodes as with one process."""
import pytest

import pixtral_fast as pf
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded
from tests.support.constraints import ForcedTokens
from tests.support.tp import CPU_FP32, tp_engine

FORCED = [5000, 17, 123456, 900]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def run(engine, constraint):
    params = pf.SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
    requests = [Encoded(tokens=[1] + [1000 + 11 * i + t for t in range(9)], images=[]) for i in range(2)]
    seqs = [engine.add_request(requests[0], params, constraint=constraint), engine.add_request(requests[1], params)]
    while engine.has_unfinished():
        engine.step()
    return [s.generated for s in seqs]


def test_a_constrained_request_at_tp2(tiny):
    with pf.Engine.from_pretrained(tiny, **(CPU_FP32 | {"num_blocks": 64})) as one:
        eos, vocab = one.tokenizer.eos_id, one.vocab_size
        want = run(one, ForcedTokens(FORCED, eos, vocab))
    with tp_engine(tiny, 2) as two:
        got = run(two, ForcedTokens(FORCED, eos, vocab))
    assert want[0] == got[0] == FORCED + [eos]
    assert got[1] == want[1] and len(want[1]) == 12
