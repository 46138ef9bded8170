"""A hidden state that overflows its normalization: weights so large (yet finite) that a hidden
state overflows its RMSNorm and every logit comes out 0 end each request with an error saying so,
whether it happens at prefill or inside the decode step, dense or quantized."""
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.model.quantized import quantize_model
from pixtral_fast.runtime.sampling import SamplingParams
from pixtral_fast.runtime.scheduler import Sequence
from tests.support.engines import assert_clean, load_tiny, new_engine, tiny_dir, tok  # noqa: F401  (fixtures)
from tests.support.token_prompts import NEVER, prompt, run

OVERFLOW = 1e30  # finite in fp32, but its square is not: mean(x^2) of the next RMSNorm is inf


def scale_of(linear) -> torch.Tensor:
    """The weight of a dense linear, or the scales of a quantized one (whatever layout it holds)."""
    names = [n for n, _ in linear.named_buffers() if "scale" in n]
    return linear.get_buffer(names[0]) if names else linear.weight


def poison(model, layer: int = 0) -> None:
    """w2 of one layer (its scales, when quantized) times OVERFLOW: finite weights, a hidden
    state too large for the next RMSNorm, which then gives 0, and every logit 0."""
    with torch.no_grad():
        scale_of(model.layers[layer].feed_forward.w2).mul_(OVERFLOW)


def assert_overflow_error(seq: Sequence, at_token: int) -> None:
    assert seq.finish_reason == "error", (seq.finish_reason, seq.generated)
    assert f"at new token {at_token}" in seq.error and "all equal" in seq.error and "overflowed" in seq.error
    assert len(seq.generated) == at_token


@pytest.mark.parametrize("scheme", [None, "w4a16", "fp8"])
def test_an_overflowed_hidden_state_ends_every_request_with_an_error(tiny_dir, tok, scheme):
    """Once: token 0 until the length limit, finish "length", no error."""
    poisoned = load_tiny(tiny_dir)
    if scheme is not None:
        quantize_model(poisoned, scheme, group_size=32)
    poison(poisoned, layer=0)
    assert torch.equal(poisoned(torch.tensor([1, 1000, 1001])), torch.zeros(3, poisoned.args.text.vocab_size))
    eng = new_engine(poisoned, tok)
    seqs = run(eng, prompt(5), prompt(9, first=2000), max_new_tokens=8)
    for seq in seqs:  # the weights are everyone's: each request fails, at its first token
        assert_overflow_error(seq, at_token=0)
    assert_clean(eng)
    with pytest.raises(pf.RequestError, match="all equal"):
        eng.generate(prompt(5), max_new_tokens=4)
    assert_clean(eng)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's, and meant
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_an_overflow_during_decode_is_caught_by_the_decode_step(tiny_dir, tok, backend):
    """The decode step (the body a CUDA graph replays; our kernels under "fast") flags the row
    too, not only prefill: the weights go bad after the first token."""
    weights = pf.load_model(tiny_dir, device="cpu", dtype=torch.float32, backend=backend, progress=False)
    eng = new_engine(weights, tok)
    seqs = [eng.add_request(p, SamplingParams(max_new_tokens=8, stop_token_ids=NEVER))
            for p in (prompt(5), prompt(9, first=2000))]
    eng.step()  # prefill (token 0) and one decode step (token 1)
    assert [len(s.generated) for s in seqs] == [2, 2] and not any(s.finished for s in seqs)
    poison(weights, layer=1)
    eng.step()
    for seq in seqs:
        assert_overflow_error(seq, at_token=2)
    assert_clean(eng)
