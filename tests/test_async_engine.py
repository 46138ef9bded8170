"""AsyncEngine without HTTP: one engine thread, asyncio callers. Answers equal the offline
engine's; stop strings, closed streams and shutdown end sequences and free their blocks;
a full waiting queue refuses; text assembly keeps characters and stop strings whole."""
import asyncio
import time

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime.async_engine import AsyncEngine, EngineClosed, QueueFull
from pixtral_fast.runtime.output import StopMatcher
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded, Tokenizer
from tests.support.serve_server import data_url, picture, user_message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    return model, Tokenizer.for_checkpoint(folder)


def engine(tiny, **limits):
    model, tokenizer = tiny
    return pf.Engine.from_model(model, tokenizer, **({"num_blocks": 128, "progress": False} | limits))


def greedy(n: int) -> pf.SamplingParams:
    return pf.SamplingParams(max_new_tokens=n)


def wait_idle(ae: AsyncEngine, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while ae.snapshot["used_blocks"] or ae.snapshot["unfinished"]:
        assert time.monotonic() < deadline, ae.snapshot
        time.sleep(0.02)


def requests():
    return [user_message("One, with a picture.", data_url(picture(70, 40, 0))), user_message("Two, text only."),
            user_message("Three: two pictures.", data_url(picture(30, 60, 1)), data_url(picture(50, 20, 2)))]


def test_generate_and_stream_equal_the_offline_engine(tiny):
    expected = engine(tiny).generate(requests(), max_new_tokens=12)

    async def main():
        async with AsyncEngine(engine(tiny)) as ae:
            together = await asyncio.gather(*(ae.generate(r, greedy(12)) for r in requests()))
            pieces = [d async for d in ae.stream(requests()[0], greedy(12))]
            return together, pieces

    together, pieces = asyncio.run(main())
    assert [(r.text, r.tokens, r.prompt_tokens, r.finish_reason) for r in together] == \
        [(c.text, c.tokens, c.prompt_tokens, c.finish_reason) for c in expected]
    assert "".join(d.text for d in pieces) == expected[0].text
    assert [t for d in pieces for t in d.token_ids] == expected[0].tokens
    assert [d.finish_reason for d in pieces][-1] == "length" and not any(d.finish_reason for d in pieces[:-1])


def test_a_stop_string_ends_the_sequence_and_frees_its_blocks(tiny):
    full = engine(tiny).generate(requests()[1], max_new_tokens=24)
    stop = full.text[5:9]

    async def main():
        async with AsyncEngine(engine(tiny)) as ae:
            result = await ae.generate(requests()[1], greedy(24), stop=[stop])
            await asyncio.to_thread(wait_idle, ae)
            return result

    result = asyncio.run(main())
    assert result.text == full.text[:full.text.find(stop)] and result.finish_reason == "stop"
    assert result.tokens == full.tokens[:len(result.tokens)] and len(result.tokens) < 24


def test_closing_a_stream_early_aborts_it(tiny):
    async def main():
        async with AsyncEngine(engine(tiny)) as ae:
            async with await ae.submit(requests()[1], greedy(10_000)) as stream:
                got = [await stream.__anext__() for _ in range(3)]
            await asyncio.to_thread(wait_idle, ae)
            return got, stream.finish_reason, ae.engine.usage().used_blocks

    got, reason, used = asyncio.run(main())
    assert len(got) == 3 and reason == "abort" and used == 0


def test_a_full_waiting_queue_refuses_and_shutdown_aborts_in_flight(tiny):
    async def main():
        ae = AsyncEngine(engine(tiny, max_batch_size=1), max_waiting=1).start()
        running = await ae.submit(requests()[1], greedy(10_000))
        await running.__anext__()  # it runs: the batch of one is full
        waiting = await ae.submit(requests()[0], greedy(4))
        with pytest.raises(QueueFull, match="max_waiting=1"):
            await ae.submit(requests()[2], greedy(4))
        await ae.aclose(grace=0.2)
        tails = [[d.finish_reason async for d in s] for s in (running, waiting)]
        with pytest.raises(EngineClosed):
            await ae.submit(requests()[1], greedy(4))
        return tails, ae.engine.usage().used_blocks

    tails, used = asyncio.run(main())
    assert [t[-1] for t in tails] == ["abort", "abort"] and used == 0


def test_a_request_that_cannot_run_is_refused_with_its_reason(tiny):
    async def main():
        async with AsyncEngine(engine(tiny, max_model_len=16)) as ae:
            with pytest.raises(pf.RequestError, match="max_model_len is 16"):
                await ae.generate(Encoded(tokens=[1] + [1000] * 20, images=[]), greedy(4))
            return await ae.generate(Encoded(tokens=[1, 1000, 1001], images=[]), greedy(4))

    assert asyncio.run(main()).finish_reason == "length"


# -- text assembly ---------------------------------------------------------------------------------

BYTES = {1: b"ab", 2: "\u00e9".encode()[:1], 3: "\u00e9".encode()[1:], 4: b"cd", 5: b"STOP", 6: b"ef", 9: b"</s>"}


def decode(ids):
    return b"".join(BYTES[i] for i in ids if i != 9).decode("utf-8", errors="replace")


def test_stop_matcher_keeps_characters_whole_and_holds_back_stop_prefixes():
    m = StopMatcher(decode, stop_ids=[9], stops=["dST"])
    assert m.push(1) == "ab"
    assert m.push(2) == ""            # half of a two-byte character: held
    assert m.push(3) == "\u00e9"
    assert m.push(4) == "c"           # "d" could start "dST": held
    assert m.push(5) == "" and m.stopped  # "dSTOP": stop found, it and what follows dropped
    m = StopMatcher(decode, stop_ids=[9], stops=["dST"])
    assert m.push(4) == "c" and m.push(6) == "def" and not m.stopped  # "d" released once it cannot match
    assert m.push(9) == "" and m.finish() == ""  # the stop token adds no text
    m = StopMatcher(decode, stop_ids=[9], stops=["dST"])
    assert m.push(4) == "c" and m.finish() == "d"  # at the end, a held prefix is text


def test_a_plain_string_stop_is_one_stop_string_and_bad_arguments_are_refused(tiny):
    full = engine(tiny).generate(requests()[1], max_new_tokens=24)
    stop = full.text[5:9]
    assert any(c in full.text[:full.text.find(stop)] for c in stop)  # split into characters, it would stop early

    async def main():
        async with AsyncEngine(engine(tiny)) as ae:
            result = await ae.generate(requests()[1], greedy(24), stop=stop)
            for bad in ("", ["x", ""]):
                with pytest.raises(ValueError, match="stop"):
                    await ae.generate(requests()[1], greedy(4), stop=bad)
            with pytest.raises(TypeError, match="SamplingParams"):
                await ae.generate(requests()[1], {"max_new_tokens": 2})
            await asyncio.to_thread(wait_idle, ae)
            return result, ae.snapshot

    result, snapshot = asyncio.run(main())
    assert result.text == full.text[:full.text.find(stop)] and result.finish_reason == "stop"
    assert snapshot["unfinished"] == 0


def test_max_waiting_counts_only_requests_the_next_step_cannot_admit(tiny):
    async def main():
        ae = AsyncEngine(engine(tiny, max_batch_size=4), max_waiting=1).start()
        try:  # four at once: the batch has room for all, none of them waits
            burst = await asyncio.gather(*(ae.submit(requests()[1], greedy(10_000)) for _ in range(4)))
            for s in burst:
                await s.__anext__()
            queued = await ae.submit(requests()[0], greedy(4))  # the batch is full: this one waits
            with pytest.raises(QueueFull, match="max_waiting=1"):
                await ae.submit(requests()[2], greedy(4))
            for s in burst:
                s.abort()
            return [d.finish_reason async for d in queued][-1]
        finally:
            await ae.aclose()

    assert asyncio.run(main()) == "length"
