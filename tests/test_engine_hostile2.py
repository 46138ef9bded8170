"""Engine cases of the second hostile round: weights so large (yet finite) that a hidden state
overflows its RMSNorm and every logit comes out 0, a KV cache bigger than the memory left, the CPU
cache's default size, the queue order after a preemption, the exact admission boundaries (cache
capacity and max_model_len, one token either side), and a short request queued behind long ones
under a small prefill budget."""
from unittest.mock import patch

import pytest
import torch

import pixtral_fast as pf
import pixtral_fast.runtime.kv_cache as kv_cache_module
from pixtral_fast.cpu_memory import blocks_wanted
from pixtral_fast.quant.model import quantize_model
from pixtral_fast.runtime.kv_cache import BlockManager
from pixtral_fast.runtime.sampling import SamplingParams
from pixtral_fast.runtime.scheduler import Scheduler, Sequence
from pixtral_fast.tokenizer import Encoded
from tests.support.engines import assert_clean, load_tiny, model, new_engine, tiny_dir, tok  # noqa: F401  (fixtures)
from tests.test_engine import chat, picture

OVERFLOW = 1e30  # finite in fp32, but its square is not: mean(x^2) of the next RMSNorm is inf
NEVER = (0,)     # <unk> as the only stop token: never sampled by the tiny model here


def prompt(n: int, first: int = 1000) -> Encoded:
    return Encoded(tokens=[1] + [first + i % 7 for i in range(n - 1)], images=[])


def run(eng, *requests: Encoded, max_new_tokens: int = 100) -> list[Sequence]:
    seqs = [eng.add_request(r, SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=NEVER)) for r in requests]
    while eng.has_unfinished():
        eng.step()
    return seqs


@pytest.fixture(scope="module")
def image_request(tok):
    return tok.encode(chat("What is it?", picture(40, 24, 0)))


# -- a hidden state that overflows its normalization ----------------------------------------------

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


# -- the KV cache's size --------------------------------------------------------------------------

@pytest.mark.parametrize("limits, named", [(dict(num_blocks=10**12), "num_blocks=1000000000000"),
                                           (dict(num_blocks=None, memory_bytes=10**18), "memory_bytes=1000000000000000000")])
def test_a_cache_larger_than_the_memory_left_is_refused_before_allocation(model, tok, limits, named):
    per_block = 2 * 2 * 16 * 2 * 64 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads of 64, fp32
    blocks = limits["num_blocks"] or limits["memory_bytes"] // per_block
    with pytest.raises(ValueError, match=rf"^{named}: the KV cache needs {blocks * per_block} bytes \({blocks} "
                                         rf"blocks of {per_block} bytes\) but \d+ bytes are available on the host"):
        new_engine(model, tok, **limits)


@pytest.mark.parametrize("spare, fits", [(-1, False), (0, True), (1, True)])
def test_the_memory_check_is_exact_at_its_bound(model, tok, spare, fits):
    need = 64 * 2 * 2 * 16 * 2 * 64 * 4
    with patch.object(kv_cache_module, "available_host_bytes", lambda: need + spare):
        if fits:
            assert new_engine(model, tok, num_blocks=64).cache.shape.num_blocks == 64
        else:
            with pytest.raises(ValueError, match=f"needs {need} bytes .* but {need - 1} bytes are available"):
                new_engine(model, tok, num_blocks=64)


def test_the_cpu_default_cache_is_sized_for_the_limits_not_a_fixed_budget(model, tok):
    """max_batch_size sequences of max_model_len tokens, plus the scratch block: not 512 MB."""
    eng = pf.Engine.from_model(model, tok, max_batch_size=2, max_model_len=64, progress=False)
    assert eng.cache.shape.num_blocks == blocks_wanted(16, 2, 64) == 9
    assert run(eng, prompt(60), prompt(60))[0].finish_reason == "length"  # each gets its whole context


# -- preemption: back to the front of the queue ---------------------------------------------------

def sequence(i: int, n: int) -> Sequence:
    return Sequence(id=i, prompt=[1] * n, images=[], params=SamplingParams(), seed=i)


def test_a_preempted_sequence_goes_back_to_the_front_of_the_queue():
    """Two running (the batch is full), one waiting; both running need a block and only one is
    free: the newer is preempted, and it must start again before the one that was waiting."""
    sched = Scheduler(BlockManager(num_blocks=4, block_size=16), max_batch=2, max_prefill_tokens=1000,
                      max_model_len=1000)
    a, b, c = sequence(0, 16), sequence(1, 16), sequence(2, 8)
    for seq in (a, b, c):
        sched.add(seq)
    assert sched.admit() == [a, b] and list(sched.waiting) == [c]
    assert sched.reserve_decode() == [a]  # 16 tokens each: the 17th needs a block, one is free
    assert sched.preemptions == 1 and list(sched.waiting) == [b, c]
    sched.blocks.append(a.id)
    sched.finish(a, "length")
    assert sched.admit() == [b, c]


def test_the_engine_resumes_a_preempted_request_before_later_ones(model, tok):
    eng = new_engine(model, tok, num_blocks=4, max_batch_size=2)  # 3 usable blocks of 16 tokens
    first, second, third = (eng.add_request(prompt(16, first=1000 + 100 * i),
                                            SamplingParams(max_new_tokens=4, stop_token_ids=NEVER)) for i in range(3))
    eng.step()  # first and second prefill (one block each); the decode step needs two more blocks
    assert eng.scheduler.preemptions == 1
    assert eng.scheduler.running == [first] and list(eng.scheduler.waiting) == [second, third]
    while eng.has_unfinished():
        eng.step()
    assert [s.finish_reason for s in (first, second, third)] == ["length"] * 3
    assert_clean(eng)


# -- admission: exactly at each bound --------------------------------------------------------------

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


# -- a short request behind long ones --------------------------------------------------------------

def test_a_short_request_queued_behind_long_prompts_starts_before_them(model, tok):
    """Two copies of a prompt longer than the prefill budget (as a request with n=2 makes), then a
    short one: the short one prefills first; the long prompt then prefills once, alone, for both
    copies; every step decodes every running request."""
    eng = new_engine(model, tok, max_prefill_tokens=32)
    long_a, long_b, short = (eng.add_request(p, SamplingParams(max_new_tokens=6, stop_token_ids=NEVER))
                             for p in (prompt(40), prompt(40), prompt(8, first=3000)))
    prefills, admit = [], eng.scheduler.admit
    prefilled_rows, decode_hidden = [], eng.model.decode_hidden

    def recording_admit():
        group = admit()
        prefills.append([s.id for s in group])
        return group

    def recording_decode_hidden(h, meta, caches=None):
        if not meta.is_decode:
            prefilled_rows.append(h.shape[0])
        return decode_hidden(h, meta, caches)

    with patch.object(eng.scheduler, "admit", recording_admit), \
            patch.object(eng.model, "decode_hidden", recording_decode_hidden):
        eng.step()
        assert [len(s.generated) for s in (long_a, long_b, short)] == [0, 0, 2]  # prefill + one decode
        eng.step()
        assert [len(s.generated) for s in (long_a, long_b, short)] == [2, 2, 3]
        while eng.has_unfinished():
            eng.step()
    assert prefills[:2] == [[short.id], [long_a.id, long_b.id]] and not any(prefills[2:])
    assert prefilled_rows == [8, 40]  # the copies' prompt through the decoder once
    assert all(s.finish_reason == "length" and len(s.generated) == 6 for s in (long_a, long_b, short))
    assert long_a.generated == long_b.generated == run(new_engine(model, tok), prompt(40), max_new_tokens=6)[0].generated
    assert_clean(eng)


def test_copies_of_a_prompt_are_prefilled_once_and_sample_apart(model, tok, image_request):
    """n copies of one request (image included) in one batch: one ViT and decoder pass, the cache
    blocks copied; each copy samples with its own seed and gets what it gets alone."""
    params = [SamplingParams(max_new_tokens=5, temperature=1.0, seed=seed, stop_token_ids=NEVER) for seed in (1, 2, 3)]
    alone = []
    for p in params:
        eng = new_engine(model, tok)
        seq = eng.add_request(image_request, p)
        while eng.has_unfinished():
            eng.step()
        alone.append(seq.generated)
    eng = new_engine(model, tok)
    seqs = [eng.add_request(image_request, p) for p in params]
    with patch.object(eng.model, "encode_images", wraps=eng.model.encode_images) as vit:
        while eng.has_unfinished():
            eng.step()
    assert [len(call.args[0]) for call in vit.call_args_list] == [1]  # one image through the ViT, once
    assert [s.generated for s in seqs] == alone and len({tuple(a) for a in alone}) > 1
    assert_clean(eng)


def test_a_long_prompt_is_passed_over_once_at_most():
    """Short requests arriving every step go first once; then the long one starts (alone), so
    a stream of short ones never starves it."""
    sched = Scheduler(BlockManager(num_blocks=64, block_size=16), max_batch=8, max_prefill_tokens=32,
                      max_model_len=1000)
    long = sequence(0, 40)
    sched.add(long)
    sched.add(sequence(1, 8))
    assert [s.id for s in sched.admit()] == [1]
    sched.add(sequence(2, 8))
    assert sched.admit() == [long]
    assert [s.id for s in sched.admit()] == [2]


def test_prompts_within_the_budget_prefill_together_and_in_order():
    sched = Scheduler(BlockManager(num_blocks=64, block_size=16), max_batch=8, max_prefill_tokens=32,
                      max_model_len=1000)
    seqs = [sequence(0, 10), sequence(1, 20), sequence(2, 5), sequence(3, 2)]
    for seq in seqs:
        sched.add(seq)
    assert [s.id for s in sched.admit()] == [0, 1, 3]  # 30 tokens; 2 (5 more) waits one step
    assert [s.id for s in sched.admit()] == [2]


# -- a vocabulary smaller than the tokenizer's is refused at load ----------------------------------

def test_a_vocabulary_smaller_than_its_tokenizer_is_refused_before_any_weight_loads(tmp_path, tok):
    import dataclasses

    from pixtral_fast.tiny import TINY_ARGS, make_tiny

    words = tok.tekken.n_words
    args = TINY_ARGS
    for vocab, refused in ((words - 1, True), (words, False)):
        args = dataclasses.replace(TINY_ARGS, text=dataclasses.replace(TINY_ARGS.text, vocab_size=vocab))
        folder = make_tiny(tmp_path / str(vocab), seed=0, args=args)
        if refused:
            with pytest.raises(pf.CheckpointError, match=rf"vocab_size {vocab}\) is smaller than its tokenizer's "
                                                         rf"\({words} tokens\)"):
                pf.Engine.from_pretrained(folder, device="cpu", dtype=torch.float32, backend="reference")
            model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference")
            with pytest.raises(pf.CheckpointError, match="smaller than its tokenizer's"):
                pf.Engine.from_model(model, tok)
        else:
            pf.Engine.from_pretrained(folder, device="cpu", dtype=torch.float32, backend="reference").close()


def test_a_max_model_len_past_the_models_context_is_refused_not_clamped(model):
    context = model.args.text.max_seq_len
    with pytest.raises(ValueError, match=rf"max_model_len={context + 1} is more than the model's context "
                                         rf"\({context} tokens"):
        pf.Engine.from_model(model, max_model_len=context + 1, num_blocks=8)
    engine = pf.Engine.from_model(model, max_model_len=context, num_blocks=8)
    assert engine.max_model_len == context
    engine.close()
