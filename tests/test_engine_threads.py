"""generate() and stream() from several threads on one engine: the callers batch together and
each gets exactly the answer it would get alone; abort() from another thread ends a request."""
import threading
import time
from unittest.mock import patch

import pytest

from tests.support.engines import assert_clean, model, new_engine, tiny_dir, tok  # noqa: F401  (fixtures)
from tests.test_engine import chat, picture


def jobs(tok):
    a = tok.encode(chat("What is it?", picture(40, 24, 0)))
    b = tok.encode(chat("Text only, please."))
    c = tok.encode(chat("Two pictures?", picture(20, 20, 1), picture(30, 16, 2)))
    return [  # (how, request, sampling): greedy and seeded, one request and a batch, generate and stream
        ("generate", a, dict(max_new_tokens=5)),
        ("stream", b, dict(max_new_tokens=5, temperature=0.9, seed=7)),
        ("generate", [a, c], dict(max_new_tokens=4, temperature=0.7, top_k=50, seed=3)),
        ("stream", c, dict(max_new_tokens=5)),
        ("generate", b, dict(max_new_tokens=4, temperature=1.3, seed=11)),
        ("stream", a, dict(max_new_tokens=4, temperature=0.8, top_p=0.9, seed=5)),
    ]


def run(eng, job):
    how, request, sampling = job
    if how == "stream":
        return "".join(eng.stream(request, **sampling))
    out = eng.generate(request, **sampling)
    return [(c.tokens, c.text, c.finish_reason) for c in (out if isinstance(out, list) else [out])]


@pytest.mark.parametrize("num_blocks", [64, 7])  # 7: too small for all at once, so requests wait and get preempted
def test_threads_get_the_answers_they_get_alone(model, tok, num_blocks):
    work = jobs(tok)
    alone = [run(new_engine(model, tok), job) for job in work]
    eng = new_engine(model, tok, num_blocks=num_blocks, max_batch_size=8)
    prefill_sizes = []
    original_prefill = eng.executor.prefill

    def counting_prefill(batch, *args, **kwargs):
        prefill_sizes.append(len(batch.params))  # one entry per sequence, copies of a prompt included
        return original_prefill(batch, *args, **kwargs)

    results, failures = [None] * len(work), []

    def worker(i):
        try:
            results[i] = run(eng, work[i])
        except BaseException as e:  # noqa: BLE001  (reported below, with the thread's job)
            failures.append((i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(work))]
    with patch.object(eng.executor, "prefill", counting_prefill):
        with eng._lock:  # no step runs until every caller has added its requests: they must batch
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while eng.usage().waiting < 7 and time.monotonic() < deadline:  # 7 requests in all
                time.sleep(0.01)
        for t in threads:
            t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not failures, failures
    assert results == alone
    if num_blocks == 64:
        assert prefill_sizes[0] == 7, "the callers' requests did not share a step"
    else:
        assert len(prefill_sizes) > 1, "the small cache never made a request wait"  # 9 blocks of prompts, 6 free
    assert_clean(eng)


def test_abort_from_another_thread_ends_a_stream(model, tok):
    eng = new_engine(model, tok)
    request = tok.encode(chat("Say something long."))
    stream = eng.stream(request, max_new_tokens=200)
    next(stream)
    seq = eng.scheduler.running[0]
    aborter = threading.Thread(target=lambda: (eng.abort(seq), eng.abort(seq)))
    aborter.start()
    aborter.join(timeout=60)
    rest = list(stream)  # the stream ends quietly: its request is over
    assert seq.finish_reason == "abort" and len(seq.generated) < 200 and len(rest) <= len(seq.generated)
    assert_clean(eng)
