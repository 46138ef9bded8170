"""The order the scheduler admits requests in, on the Scheduler alone and through the engine: a
preempted request goes back to the front of the queue; a short request queued behind prompts longer
than the prefill budget starts before them, and a long prompt is passed over once at most; copies of
one prompt are prefilled once; prompts within the budget prefill together, in order."""
from unittest.mock import patch

import pytest

from pixtral_fast.runtime.kv_cache import BlockManager
from pixtral_fast.runtime.sampling import SamplingParams
from pixtral_fast.runtime.scheduler import Scheduler, Sequence
from tests.support.engines import assert_clean, model, new_engine, tiny_dir, tok  # noqa: F401  (fixtures)
from tests.support.token_prompts import NEVER, prompt, run
from tests.test_engine import chat, picture


@pytest.fixture(scope="module")
def image_request(tok):
    return tok.encode(chat("What is it?", picture(40, 24, 0)))


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


# -- a short request behind long ones --------------------------------------------------------------

def test_a_short_request_queued_behind_long_prompts_starts_before_them(model, tok):
    """Two copies of a prompt longer than the prefill budget (as a request with n=2 makes), then a
    short one: the short one prefills first; the long prompt then prefills once, alone, for both
    copies; every step decodes every running request."""
    eng = new_engine(model, tok, max_prefill_tokens=32)
    long_a, long_b, short = (eng.add_request(p, SamplingParams(max_new_tokens=6, stop_token_ids=NEVER))
                             for p in (prompt(40), prompt(40), prompt(8, first=3000)))
    prefills, admit = [], eng.scheduler.admit
    prefilled_rows, run_decoder = [], eng.model.run_decoder

    def recording_admit():
        group = admit()
        prefills.append([s.id for s in group])
        return group

    def recording_run_decoder(h, meta, caches=None):
        if not meta.is_decode:
            prefilled_rows.append(h.shape[0])
        return run_decoder(h, meta, caches)

    with patch.object(eng.scheduler, "admit", recording_admit), \
            patch.object(eng.model, "run_decoder", recording_run_decoder):
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
